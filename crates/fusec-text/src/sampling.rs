//! Choosing the next token from a step's logits: greedy by default, or sampling after
//! transformers' logits processors, in the order `generate` applies them
//! (`generation/utils.py`, `_get_logits_processor`): the repetition penalty, then the
//! warpers temperature, top-k, top-p and min-p (`generation/logits_process.py`), then
//! a draw from the softmax.
//!
//! The draw uses ChaCha8 seeded with `--seed`, so a run is deterministic for a seed;
//! its numbers are not torch's, so the tests compare the processed logits, not the
//! draws, with transformers'.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::Error;

/// The options of `fusec run`; the default is greedy decoding.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplingOptions {
    /// `None`: greedy (argmax), whatever the other options say.
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: u64,
}

impl SamplingOptions {
    /// Whether the options choose anything but the plain argmax of the logits (a
    /// temperature samples; a repetition penalty changes the logits first), so that a
    /// caller holding the argmax already needs no [`Sampler`] otherwise.
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_none() && self.repetition_penalty.is_none()
    }

    /// Checks the ranges transformers' processors accept.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Sampling(m));
        if let Some(t) = self.temperature {
            if !(t.is_finite() && t > 0.0) {
                return bad(format!("--temperature must be a positive number, got {t}"));
            }
        }
        if self.top_k == Some(0) {
            return bad("--top-k must be at least 1".into());
        }
        if let Some(p) = self.top_p {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("--top-p must be in [0, 1], got {p}"));
            }
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("--min-p must be in [0, 1], got {p}"));
            }
        }
        if let Some(r) = self.repetition_penalty {
            if !(r.is_finite() && r > 0.0) {
                return bad(format!(
                    "--repetition-penalty must be a positive number, got {r}"
                ));
            }
        }
        Ok(())
    }
}

/// `RepetitionPenaltyLogitsProcessor`: every id seen so far (prompt included), once:
/// a negative logit is multiplied by the penalty, a positive one divided by it.
pub fn repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    let mut done = vec![false; logits.len()];
    for &id in seen {
        let i = id as usize;
        if i < logits.len() && !done[i] {
            done[i] = true;
            let s = logits[i];
            logits[i] = if s < 0.0 { s * penalty } else { s / penalty };
        }
    }
}

/// `TemperatureLogitsWarper`: logits divided by the temperature.
pub fn temperature(logits: &mut [f32], t: f32) {
    logits.iter_mut().for_each(|s| *s /= t);
}

/// `TopKLogitsWarper`: logits below the k-th largest become -inf (ties with it stay).
pub fn top_k(logits: &mut [f32], k: usize) {
    let k = k.min(logits.len());
    if k == 0 {
        return;
    }
    let mut sorted: Vec<f32> = logits.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    logits
        .iter_mut()
        .filter(|s| **s < kth)
        .for_each(|s| *s = f32::NEG_INFINITY);
}

/// The softmax of `logits` in `f32`, as `torch.softmax` (max subtracted).
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&s| (s - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// `TopPLogitsWarper`: sorted ascending, the tokens whose cumulative probability is at
/// most `1 - top_p` become -inf; the most likely token always stays.
pub fn top_p(logits: &mut [f32], p: f32) {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Ascending, stable, as `torch.sort(descending=False)` orders distinct values.
    order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]));
    let sorted: Vec<f32> = order.iter().map(|&i| logits[i]).collect();
    let probs = softmax(&sorted);
    let mut cumulative = 0.0f32;
    let last = order.len().saturating_sub(1);
    for (rank, (&i, &prob)) in order.iter().zip(&probs).enumerate() {
        cumulative += prob;
        if cumulative <= 1.0 - p && rank < last {
            logits[i] = f32::NEG_INFINITY;
        }
    }
}

/// `MinPLogitsWarper`: tokens whose probability is below `min_p` times the largest
/// become -inf; the most likely token always stays.
pub fn min_p(logits: &mut [f32], min_p: f32) {
    let probs = softmax(logits);
    let top = probs.iter().copied().fold(0.0f32, f32::max);
    let threshold = min_p * top;
    let best = argmax(logits);
    for (i, (s, &prob)) in logits.iter_mut().zip(&probs).enumerate() {
        if prob < threshold && i != best {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// The first index of the largest logit (`torch.argmax`'s choice among ties).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &s) in logits.iter().enumerate() {
        if s > logits[best] {
            best = i;
        }
    }
    best
}

/// Chooses tokens step by step with one set of options and its own seeded generator.
#[derive(Debug)]
pub struct Sampler {
    options: SamplingOptions,
    rng: ChaCha8Rng,
    scratch: Vec<f32>,
}

impl Sampler {
    pub fn new(options: SamplingOptions) -> Result<Sampler, Error> {
        options.validate()?;
        Ok(Sampler {
            rng: ChaCha8Rng::seed_from_u64(options.seed),
            options,
            scratch: Vec::new(),
        })
    }

    /// The logits after the processors `generate` would apply (greedy: only the
    /// repetition penalty, as `generate` applies it before its argmax).
    pub fn process(&mut self, logits: &[f32], seen: &[u32]) -> &[f32] {
        let o = &self.options;
        self.scratch.clear();
        self.scratch.extend_from_slice(logits);
        if let Some(r) = o.repetition_penalty {
            repetition_penalty(&mut self.scratch, seen, r);
        }
        if let Some(t) = o.temperature {
            temperature(&mut self.scratch, t);
            if let Some(k) = o.top_k {
                top_k(&mut self.scratch, k);
            }
            if let Some(p) = o.top_p.filter(|&p| p < 1.0) {
                top_p(&mut self.scratch, p);
            }
            if let Some(p) = o.min_p.filter(|&p| p > 0.0) {
                min_p(&mut self.scratch, p);
            }
        }
        &self.scratch
    }

    /// The next token after `seen` (the prompt and what was generated), from `logits`.
    pub fn next(&mut self, logits: &[f32], seen: &[u32]) -> u32 {
        let sampling = self.options.temperature.is_some();
        self.process(logits, seen);
        if !sampling {
            return argmax(&self.scratch) as u32;
        }
        let probs = softmax(&self.scratch);
        // Inverse CDF in f64 over the vocabulary in order.
        let u: f64 = self.rng.random::<f64>();
        let mut cumulative = 0.0f64;
        let mut last_positive = 0;
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                last_positive = i;
                cumulative += f64::from(p);
                if u < cumulative {
                    return i as u32;
                }
            }
        }
        last_positive as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_ignores_the_seed_and_sampling_is_deterministic_per_seed() {
        // A permutation of 0..50 (37 is coprime to 50): distinct logits.
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 50) as f32 * 0.1).collect();
        let greedy = |seed| {
            Sampler::new(SamplingOptions {
                seed,
                ..Default::default()
            })
            .expect("valid")
            .next(&logits, &[])
        };
        assert_eq!(greedy(1), greedy(2));
        let draws = |seed| {
            let mut s = Sampler::new(SamplingOptions {
                temperature: Some(1.5),
                seed,
                ..Default::default()
            })
            .expect("valid");
            (0..64).map(|_| s.next(&logits, &[])).collect::<Vec<u32>>()
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
        // Top-k 1 leaves one token whatever the draw.
        let mut s = Sampler::new(SamplingOptions {
            temperature: Some(2.0),
            top_k: Some(1),
            ..Default::default()
        })
        .expect("valid");
        let best = argmax(&logits) as u32;
        assert!((0..32).all(|_| s.next(&logits, &[]) == best));
    }

    #[test]
    fn bad_options_are_named() {
        let bad = SamplingOptions {
            top_p: Some(1.5),
            ..Default::default()
        };
        assert!(Sampler::new(bad)
            .expect_err("bad")
            .to_string()
            .contains("--top-p"));
    }
}
