//! Prefill: a [`Session`]'s prompt fed `T` tokens per sequence at a time through a
//! prefill-step graph (`fusec_model::blocks::StepDims::prefill`), instead of one token
//! per decode step.
//!
//! A prefill graph has the decode graph's interface with `T` positions per sequence:
//! `input_ids` and `position_ids` `[B,T]`, an additive mask `[B,1,T,S+T]` that is
//! causal over the new tokens (transformers' `causal_mask_function` in
//! masking_utils.py: key `k` is visible to query `q` when `k <= q`), a window's mask
//! `[B,1,T,min(S,W)+T]` over the ring before the step and the new tokens (visible
//! when also `q - W < k`, `sliding_window_overlay`), the same state caches appended by
//! `T` entries, and `logits` for the last position (`[B,1,V]`) or every position
//! (`[B,T,V]`). Its caches are the session's: a [`Prefill`] borrows them by name for
//! one step and hands the grown ones back, so decoding goes on from where the prefill
//! left off.
//!
//! A prompt longer than one graph's `T` is prefilled in chunks
//! ([`Session::generate_prefilled`]), the chunked prefill of Agrawal et al., 2023
//! ("SARATHI"): each chunk attends to the cache of the chunks before it, so memory
//! per step is bounded by the chunk (its scores are `T x (S+T)`, not the prompt's
//! square), and the result equals one prefill of the whole prompt.

use std::sync::Arc;

use fusec_ir::shape::Bindings;
use fusec_ir::{step, DType, InputKind, OutputKind, TensorType};
use ndarray::{Array2, Array3};

use crate::decode::{at_step, bad, bindings, Generation, Session, StepOutput};
use crate::error::Error;
use crate::exec::{self, Executor, RunOutput, Value};
use crate::kernels::attention::masked;
use crate::pool;
use crate::profile::StepStats;
use crate::tensor::Tensor;

/// What a prefill data input holds.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Feed {
    Ids,
    Positions,
    /// The additive mask of the whole cache (`None`) or of a window of `W` positions.
    Mask(Option<u64>),
}

/// A prefill graph's executor, ready to run steps of a [`Session`] (see the module
/// documentation).
#[derive(Debug)]
pub struct Prefill {
    exec: Executor,
    /// Tokens per sequence per step, `T`.
    tokens: usize,
    /// Logits rows per sequence: 1 (the last position) or `T`.
    rows: usize,
    /// Data inputs by input position.
    data: Vec<(usize, Feed, TensorType)>,
    /// State inputs: input position and name.
    states: Vec<(usize, Arc<str>)>,
    inputs: Vec<Option<Tensor>>,
    bindings: Bindings,
    run: RunOutput,
}

/// One prefill step's results.
#[derive(Clone, Debug, Default)]
pub struct PrefillOutput {
    /// `[batch, rows, vocab]`: the last position's logits, or every position's.
    pub logits: Array3<f32>,
    /// The greedy next token of each sequence (after the step's last position).
    pub next: Vec<i32>,
    pub stats: StepStats,
}

impl Prefill {
    /// Wraps `exec`, an executor of a prefill graph: checks its interface and reads
    /// `T` from its `input_ids` `[B,T]`.
    pub fn new(exec: Executor) -> Result<Prefill, Error> {
        let graph = exec.graph();
        let mut data = Vec::new();
        let mut states = Vec::new();
        let mut tokens = None;
        for (index, (id, name, kind)) in graph.inputs().into_iter().enumerate() {
            let ty = graph
                .ty(id)
                .tensor()
                .ok_or_else(|| Error::InvalidGraph(format!("input `{name}` has a tuple type")))?
                .clone();
            let feed = match kind {
                InputKind::State => {
                    states.push((index, Arc::from(name)));
                    continue;
                }
                InputKind::Data if name == step::INPUT_IDS => {
                    tokens = ty.shape.dims().get(1).and_then(|d| d.as_fixed());
                    Feed::Ids
                }
                InputKind::Data if name == step::POSITION_IDS => Feed::Positions,
                InputKind::Data => match step::mask_window(name) {
                    Some(w) => Feed::Mask(w),
                    None => {
                        return Err(Error::InvalidGraph(format!(
                            "a prefill cannot feed data input `{name}`"
                        )))
                    }
                },
            };
            if matches!(feed, Feed::Ids | Feed::Positions)
                && (ty.dtype != DType::I32 || ty.shape.rank() != 2)
            {
                return Err(Error::InvalidGraph(format!(
                    "input `{name}` is {ty}, not [B,T] i32"
                )));
            }
            data.push((index, feed, ty));
        }
        let tokens = tokens
            .and_then(|t| usize::try_from(t).ok())
            .filter(|&t| t > 0)
            .ok_or_else(|| {
                Error::InvalidGraph(format!(
                    "a prefill graph needs `{}` [B,T] with a fixed T of at least 1",
                    step::INPUT_IDS
                ))
            })?;
        let rows = graph
            .output(step::LOGITS)
            .and_then(|o| graph.ty(o.value).tensor())
            .filter(|t| t.shape.rank() == 3)
            .and_then(|t| t.shape.dims()[1].as_fixed())
            .and_then(|r| usize::try_from(r).ok())
            .filter(|&r| r == 1 || r == tokens)
            .ok_or_else(|| {
                Error::InvalidGraph(format!(
                    "`{}` must be [B,1,V] or [B,{tokens},V]",
                    step::LOGITS
                ))
            })?;
        let inputs = vec![None; exec.input_names().len()];
        Ok(Prefill {
            exec,
            tokens,
            rows,
            data,
            states,
            inputs,
            bindings: bindings(1, 0),
            run: RunOutput::new(),
        })
    }

    /// Tokens per sequence per step, `T`.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Logits rows per sequence per step: 1, or `T` for a graph built with every
    /// position's logits.
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn executor(&self) -> &Executor {
        &self.exec
    }

    /// Makes the data inputs of a step of `batch` sequences at `past` cached positions.
    fn feed(&mut self, tokens: &[i32], batch: usize, past: usize) -> Result<(), Error> {
        let t = self.tokens;
        let names = self.exec.input_names();
        for (index, feed, ty) in &self.data {
            let shape = exec::dims(&ty.shape, &self.bindings)?;
            let numel: usize = shape.iter().product();
            let tensor = match *feed {
                Feed::Ids => {
                    let mut ids = pool::take(numel);
                    ids.extend_from_slice(tokens);
                    Tensor::from_kernel_i32(shape, ids)
                }
                Feed::Positions => {
                    let mut ids = pool::take(numel);
                    for _ in 0..batch {
                        for i in 0..t {
                            let p = i32::try_from(past + i)
                                .map_err(|_| bad(step::POSITION_IDS, "position overflows i32"))?;
                            ids.push(p);
                        }
                    }
                    Tensor::from_kernel_i32(shape, ids)
                }
                Feed::Mask(window) => {
                    let keys = shape.last().copied().unwrap_or(0);
                    let mut mask = pool::take(numel);
                    let min = masked(ty.dtype);
                    for _ in 0..batch {
                        for i in 0..t {
                            let q = past + i;
                            mask.extend((0..keys).map(|k| {
                                let visible = match t {
                                    // A decode step's key is every cached position
                                    // (a ring holds only those inside the window).
                                    1 => true,
                                    _ => key_visible(k, q, past, t, window),
                                };
                                if visible {
                                    0.0
                                } else {
                                    min
                                }
                            }));
                        }
                    }
                    if mask.len() != numel {
                        return Err(Error::InvalidGraph(format!(
                            "mask `{}` is {ty}, not [B,1,{t},keys]",
                            names[*index]
                        )));
                    }
                    if ty.dtype == DType::I32 {
                        return Err(Error::InvalidGraph(format!(
                            "mask `{}` is not a float tensor",
                            names[*index]
                        )));
                    }
                    Tensor::from_kernel_f32(ty.dtype, shape, mask)
                }
            };
            if matches!(feed, Feed::Ids) && tensor.numel() != batch * t {
                return Err(bad(
                    step::INPUT_IDS,
                    format!("{} token(s) for {batch} x {t}", tokens.len()),
                ));
            }
            self.inputs[*index] = Some(tensor);
        }
        Ok(())
    }

    fn drop_data(&mut self) {
        for (index, _, _) in &self.data {
            if let Some(t) = self.inputs[*index].take() {
                exec::recycle(Value::Tensor(t));
            }
        }
    }
}

/// Whether key `k` of a prefill step's mask is visible to the query at position `q`:
/// keys are the cache before the step (`past` positions, or a ring of the last
/// `min(past, W)` of them in slot order `position mod W`) followed by the step's `t`
/// new positions `past .. past+t`.
fn key_visible(k: usize, q: usize, past: usize, t: usize, window: Option<u64>) -> bool {
    let Some(w) = window
        .and_then(|w| usize::try_from(w).ok())
        .filter(|&w| w > 0)
    else {
        // The whole cache, then the new tokens: key `k` is position `k`.
        return k <= q;
    };
    let held = past.min(w);
    let position = match k.checked_sub(held) {
        // A new token.
        Some(new) if new < t => past + new,
        Some(_) => return false,
        // Ring slot `k` holds the last position before `past` that is `k` mod `w`.
        None => {
            if past <= w {
                k
            } else {
                let last = past - 1;
                last - (last + w - k) % w
            }
        }
    };
    position <= q && q < position + w
}

impl Session {
    /// Feeds `tokens` (`T` per sequence, sequence by sequence) at the next `T`
    /// positions through `prefill`, a prefill graph over this session's caches. On
    /// error the session is unchanged.
    pub fn prefill(
        &mut self,
        prefill: &mut Prefill,
        tokens: &[i32],
    ) -> Result<PrefillOutput, Error> {
        let t = prefill.tokens;
        if tokens.len() != self.batch * t {
            return Err(bad(
                step::INPUT_IDS,
                format!(
                    "{} token(s) for a batch of {} with {t} per sequence",
                    tokens.len(),
                    self.batch
                ),
            ));
        }
        // Every state the prefill graph carries is one of the session's.
        let mut moved = Vec::with_capacity(prefill.states.len());
        for (index, name) in &prefill.states {
            let Some(state) = self.states.iter().find(|s| s.name == *name) else {
                return Err(Error::InvalidGraph(format!(
                    "the prefill graph's state `{name}` is not the session's"
                )));
            };
            moved.push((*index, state.index));
        }
        if moved.len() != self.states.len() {
            return Err(Error::InvalidGraph(format!(
                "the prefill graph carries {} of the session's {} states",
                moved.len(),
                self.states.len()
            )));
        }
        prefill.bindings.set(step::BATCH, self.batch as u64);
        prefill.bindings.set(step::PAST, self.past as u64);
        if let Err(e) = prefill.feed(tokens, self.batch, self.past) {
            prefill.drop_data();
            return Err(e);
        }
        for &(to, from) in &moved {
            prefill.inputs[to] = self.inputs[from].take();
        }
        let result =
            prefill
                .exec
                .run_into(&prefill.bindings, &mut prefill.inputs, &mut prefill.run);
        prefill.drop_data();
        if let Err(e) = result {
            // The executor put every input back.
            for &(to, from) in &moved {
                self.inputs[from] = prefill.inputs[to].take();
            }
            return Err(e);
        }
        let (batch, rows, vocab) = (self.batch, prefill.rows, self.vocab);
        let mut out = PrefillOutput {
            logits: Array3::zeros((batch, rows, vocab)),
            ..PrefillOutput::default()
        };
        let mut logits_ok = false;
        for (name, kind, value) in prefill.run.outputs.drain(..) {
            let state = moved
                .iter()
                .find(|&&(to, _)| *prefill.exec.input_names()[to] == *name);
            match (kind, value, state) {
                (OutputKind::State, Value::Tensor(t), Some(&(_, from))) => {
                    self.inputs[from] = Some(t);
                }
                (OutputKind::Data, Value::Tensor(t), _) if &*name == step::LOGITS => {
                    if let (Some(values), Some(dst)) =
                        (t.contiguous_f32(), out.logits.as_slice_mut())
                    {
                        logits_ok = values.len() == dst.len();
                        if logits_ok {
                            dst.copy_from_slice(&values);
                        }
                    }
                    exec::recycle(Value::Tensor(t));
                }
                (_, v, _) => exec::recycle(v),
            }
        }
        if self.states.iter().any(|s| self.inputs[s.index].is_none()) {
            return Err(Error::InvalidGraph(
                "the prefill graph did not return every state".into(),
            ));
        }
        self.past += t;
        std::mem::swap(&mut out.stats, &mut prefill.run.stats);
        self.profile.add(&out.stats);
        if !logits_ok {
            return Err(Error::InvalidGraph(format!(
                "logits are not {batch} x {rows} x {vocab} floats"
            )));
        }
        // The greedy choice at the last position: the lowest id among the largest
        // logits (transformers' argmax).
        for s in 0..batch {
            let row = out.logits.slice(ndarray::s![s, rows - 1, ..]);
            let mut best = 0usize;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            out.next.push(best as i32);
        }
        Ok(out)
    }

    /// Checks that there is one prompt per sequence, all non-empty and of one
    /// length; returns the length.
    pub(crate) fn check_prompts(&self, prompts: &[Vec<i32>]) -> Result<usize, Error> {
        if prompts.len() != self.batch {
            return Err(bad(
                step::INPUT_IDS,
                format!("{} prompt(s) for a batch of {}", prompts.len(), self.batch),
            ));
        }
        let len = prompts[0].len();
        if len == 0 || prompts.iter().any(|p| p.len() != len) {
            return Err(bad(
                step::INPUT_IDS,
                "prompts must be non-empty and of one length",
            ));
        }
        Ok(len)
    }

    /// Feeds the prompts (one per sequence, of one length) into the caches: each of
    /// `prefills` (tried in order, the longest first) takes its `T` tokens while at
    /// least `T` prompt tokens are left; the tokens no prefill takes go through decode
    /// steps. Returns the last position's logits and greedy next tokens, and what the
    /// prompt cost.
    pub fn prefill_prompts(
        &mut self,
        prefills: &mut [&mut Prefill],
        prompts: &[Vec<i32>],
    ) -> Result<PromptFed, Error> {
        let len = self.check_prompts(prompts)?;
        let mut stats = PrefillStats::default();
        let (mut bytes, mut decode_launches) = (0u64, 0u64);
        // The last prompt position's logits and next tokens.
        let mut last = StepOutput::default();
        let mut done = 0;
        let mut chunk = Vec::new();
        while done < len {
            let left = len - done;
            let pick = prefills
                .iter_mut()
                .find(|p| p.tokens <= left && p.tokens > 1);
            match pick {
                Some(p) => {
                    let t = p.tokens;
                    chunk.clear();
                    for prompt in prompts {
                        chunk.extend_from_slice(&prompt[done..done + t]);
                    }
                    let out = self
                        .prefill(p, &chunk)
                        .map_err(|e| at_step(e, stats.steps + 1))?;
                    stats.steps += 1;
                    stats.elapsed += out.stats.time;
                    bytes += out.stats.bytes();
                    let r = out.logits.dim().1;
                    last.logits = out.logits.slice(ndarray::s![.., r - 1, ..]).to_owned();
                    last.next = out.next;
                    done += t;
                }
                None => {
                    chunk.clear();
                    chunk.extend(prompts.iter().map(|p| p[done]));
                    let out = self.step(&chunk).map_err(|e| at_step(e, stats.steps + 1))?;
                    stats.steps += 1;
                    stats.elapsed += out.stats.time;
                    bytes += out.stats.bytes();
                    decode_launches = out.stats.launches;
                    last = out;
                    done += 1;
                }
            }
        }
        stats.tokens = (len * self.batch) as u64;
        Ok(PromptFed {
            last,
            stats,
            bytes,
            decode_launches,
        })
    }

    /// [`Session::generate`] with the prompts prefilled in chunks: each of
    /// `prefills` (tried in order, the longest first) takes its `T` tokens while at
    /// least `T` prompt tokens are left; the tokens no prefill takes go through decode
    /// steps. Then `new_tokens` tokens are generated greedily. `Generation::steps`
    /// counts prefill steps and decode steps; `prefill` returns the time and steps of
    /// the prompt alone.
    pub fn generate_prefilled(
        &mut self,
        prefills: &mut [&mut Prefill],
        prompts: &[Vec<i32>],
        new_tokens: usize,
    ) -> Result<(Generation, PrefillStats), Error> {
        if prompts.len() != self.batch {
            return Err(bad(
                step::INPUT_IDS,
                format!("{} prompt(s) for a batch of {}", prompts.len(), self.batch),
            ));
        }
        if new_tokens == 0 {
            return Ok((self.no_generation(), PrefillStats::default()));
        }
        let fed = self.prefill_prompts(prefills, prompts)?;
        let stats = fed.stats;
        Ok((self.decode_after(fed, new_tokens, None)?, stats))
    }

    /// The generation after a prompt fed by [`Session::prefill_prompts`]: the last
    /// prompt position's logits and greedy tokens, then `new_tokens - 1` decode steps,
    /// each feeding every sequence its own last token, or `forced[s]`'s next (teacher
    /// forcing). `Generation` counts the prompt's graph runs too.
    pub(crate) fn decode_after(
        &mut self,
        fed: PromptFed,
        new_tokens: usize,
        forced: Option<&[Vec<i32>]>,
    ) -> Result<Generation, Error> {
        let mut gen = Generation {
            generated: vec![Vec::with_capacity(new_tokens); self.batch],
            logits: Array3::zeros((self.batch, 0, self.vocab)),
            batch: self.batch,
            steps: fed.stats.steps,
            elapsed: fed.stats.elapsed,
            bytes: fed.bytes,
            launches_per_step: fed.decode_launches,
        };
        // Each sequence's rows, `[token, vocab]` row-major, made into `gen.logits` at
        // the end.
        let mut rows: Vec<Vec<f32>> = vec![Vec::with_capacity(new_tokens * self.vocab); self.batch];
        // A non-finite logit makes the greedy choice meaningless (every comparison
        // with NaN is false), so it stops the run instead of yielding a token.
        let mut keep = |gen: &mut Generation, logits: &Array2<f32>, next: &[i32]| {
            for (sequence, row) in logits.rows().into_iter().enumerate() {
                if let Some((index, &value)) = row.iter().enumerate().find(|(_, v)| !v.is_finite())
                {
                    return Err(Error::NonFiniteLogits {
                        step: gen.steps,
                        token: gen.generated[sequence].len(),
                        sequence,
                        index,
                        value,
                    });
                }
                rows[sequence].extend(row.iter());
            }
            for (s, &t) in next.iter().enumerate() {
                gen.generated[s].push(t);
            }
            Ok(())
        };
        keep(&mut gen, &fed.last.logits, &fed.last.next)?;
        let mut tokens = Vec::with_capacity(self.batch);
        for i in 1..new_tokens {
            tokens.clear();
            match forced {
                Some(f) => tokens.extend(f.iter().map(|seq| seq[i - 1])),
                None => tokens.extend(gen.generated.iter().map(|g| g[i - 1])),
            }
            let out = self.step(&tokens).map_err(|e| at_step(e, gen.steps + 1))?;
            gen.steps += 1;
            gen.launches_per_step = out.stats.launches;
            gen.bytes += out.stats.bytes();
            gen.elapsed += out.stats.time;
            keep(&mut gen, &out.logits, &out.next)?;
        }
        let tokens = rows
            .first()
            .map_or(0, Vec::len)
            .checked_div(self.vocab)
            .unwrap_or(0);
        gen.logits = Array3::from_shape_vec((self.batch, tokens, self.vocab), rows.concat())
            .map_err(|e| Error::InvalidGraph(format!("logits: {e}")))?;
        Ok(gen)
    }
}

/// What [`Session::prefill_prompts`] leaves: the last prompt position's logits and
/// greedy next tokens, and what the prompt cost.
#[derive(Debug)]
pub struct PromptFed {
    pub last: StepOutput,
    pub stats: PrefillStats,
    /// Bytes the prompt's graph runs moved.
    pub bytes: u64,
    /// Launches of the last decode step that took a prompt token (0 when prefill
    /// graphs took them all).
    pub decode_launches: u64,
}

/// The prompt's part of [`Session::generate_prefilled`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PrefillStats {
    /// Prompt tokens, over all sequences.
    pub tokens: u64,
    /// Graph runs (prefill chunks and single-token decode steps).
    pub steps: u64,
    /// Wall time of those runs: the time to the first generated token.
    pub elapsed: std::time::Duration,
}

impl PrefillStats {
    /// Prompt tokens per second.
    pub fn tokens_per_s(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.tokens as f64 / secs
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::key_visible;

    #[test]
    fn causal_over_the_whole_cache() {
        // 3 cached, 2 new: query 3 sees keys 0..=3, query 4 sees 0..=4.
        let row = |q| {
            (0..5)
                .map(|k| key_visible(k, q, 3, 2, None))
                .collect::<Vec<_>>()
        };
        assert_eq!(row(3), [true, true, true, true, false]);
        assert_eq!(row(4), [true; 5]);
    }

    #[test]
    fn window_over_a_wrapped_ring() {
        // Window 4, 6 cached: the ring holds positions 4, 5, 2, 3 in slots 0..4; then
        // 2 new tokens at 6 and 7 (keys 4 and 5).
        let row = |q| {
            (0..6)
                .map(|k| key_visible(k, q, 6, 2, Some(4)))
                .collect::<Vec<_>>()
        };
        // Query 6 sees 3..=6: slots 1 (5), 0 (4), 3 (3) and key 4 (6).
        assert_eq!(row(6), [true, true, false, true, true, false]);
        // Query 7 sees 4..=7.
        assert_eq!(row(7), [true, true, false, false, true, true]);
        // Not yet full: 2 cached of a window of 4, 3 new at 2, 3, 4.
        let row = |q| {
            (0..5)
                .map(|k| key_visible(k, q, 2, 3, Some(4)))
                .collect::<Vec<_>>()
        };
        assert_eq!(row(4), [false, true, true, true, true]);
    }
}
