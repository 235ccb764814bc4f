//! Greedy decoding: a [`Session`] feeds a decode-step graph one token per sequence per
//! step and carries its state (the KV cache) from step to step.
//!
//! The session drives any graph with the decode interface of
//! `fusec_ir::build::names`: data inputs `input_ids` `[B,1]` (required),
//! `position_ids` `[B,1]` and an additive `attention_mask` `[B,1,1,S+1]` (optional,
//! for fused graphs that drop them), state inputs carried to the state outputs of the
//! same name, and outputs `logits` `[B,1,V]` and `next_token` `[B,1]`.
//!
//! A prompt is prefilled token by token through the same graph. All sequences of a
//! batch advance in lockstep, so prompts of one batch have equal lengths and the mask
//! is all zeros (every cached position is visible).
//!
//! The caches live in buffers with room for a number of positions (the session's
//! capacity) along their `S` axis, so that a fused graph appends to them in place and
//! moves only the new entries; a cache that outgrows its buffer is copied into one twice
//! as large (a step that does so moves more bytes than the cost model predicts). The
//! session hands its caches to the executor by value and gets the new ones back, so it
//! never holds a second handle on a buffer the step appends to.

use std::collections::HashMap;
use std::time::Duration;

use fusec_ir::build::names;
use fusec_ir::shape::Bindings;
use fusec_ir::{Dim, InputKind, OutputKind, TensorType};

use crate::error::Error;
use crate::exec::{self, Executor, Value};
use crate::profile::{Profile, StepStats};
use crate::tensor::Tensor;

/// One step's results.
#[derive(Clone, Debug)]
pub struct StepOutput {
    /// The logits of each sequence, `[batch][vocab]`.
    pub logits: Vec<Vec<f32>>,
    /// The greedy next token of each sequence.
    pub next: Vec<i32>,
    pub stats: StepStats,
}

/// The result of [`Session::generate`].
#[derive(Clone, Debug, Default)]
pub struct Generation {
    /// Generated ids, `[sequence][token]`.
    pub generated: Vec<Vec<i32>>,
    /// Logits, `[sequence][token][vocab]`: entry 0 is the output at the last prompt
    /// position, entry `i` the output of feeding generated token `i - 1`.
    pub logits: Vec<Vec<Vec<f32>>>,
    /// Graph runs (prompt tokens plus generated tokens minus one).
    pub steps: u64,
    /// Kernel launches of the last step (the same for every step of one graph).
    pub launches_per_step: u64,
    /// Bytes read and written, summed over the steps.
    pub bytes: u64,
    /// Wall time of the steps.
    pub elapsed: Duration,
    /// Sequences per step.
    pub batch: usize,
}

impl Generation {
    /// Mean bytes moved per step.
    pub fn bytes_per_step(&self) -> f64 {
        if self.steps == 0 {
            0.0
        } else {
            self.bytes as f64 / self.steps as f64
        }
    }

    /// Tokens processed per second: every step processes one token per sequence.
    pub fn tokens_per_s(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            (self.steps * self.batch as u64) as f64 / secs
        } else {
            0.0
        }
    }
}

/// The cache capacity, in positions, of [`Session::new`].
pub const DEFAULT_CAPACITY: usize = 64;

/// A decoding session over one executor. See the module documentation.
#[derive(Debug)]
pub struct Session {
    exec: Executor,
    batch: usize,
    /// Positions cached so far.
    past: usize,
    state: HashMap<String, Tensor>,
    /// Each state's name and the axis that grows by one position per step, if any.
    state_axes: Vec<(String, Option<usize>)>,
    vocab: usize,
    profile: Profile,
}

fn bad(name: &str, message: impl Into<String>) -> Error {
    Error::BadInput {
        name: name.to_string(),
        message: message.into(),
    }
}

fn eval_dims(ty: &TensorType, b: &Bindings) -> Result<Vec<usize>, Error> {
    ty.shape
        .eval(b)
        .map_err(|e| Error::Unbound(e.0))?
        .into_iter()
        .map(|d| {
            usize::try_from(d)
                .map_err(|_| Error::InvalidGraph(format!("dimension {d} does not fit in memory")))
        })
        .collect()
}

/// The axis of a state type that holds the cached positions (the one sized by `S`).
fn growing_axis(ty: &TensorType) -> Option<usize> {
    ty.shape
        .dims()
        .iter()
        .position(|d| matches!(d, Dim::Sym { name, .. } if name == names::PAST))
}

impl Session {
    /// A session decoding `batch` sequences with empty caches, with room for
    /// [`DEFAULT_CAPACITY`] positions before a cache has to grow.
    pub fn new(exec: Executor, batch: usize) -> Result<Session, Error> {
        Session::with_capacity(exec, batch, DEFAULT_CAPACITY)
    }

    /// A session whose caches have room for `positions` positions (prompt plus
    /// generated tokens) before they have to grow.
    pub fn with_capacity(exec: Executor, batch: usize, positions: usize) -> Result<Session, Error> {
        if batch == 0 {
            return Err(bad("batch", "must be at least 1"));
        }
        let graph = exec.graph();
        let b = bindings(batch, 0);
        let mut state = HashMap::new();
        let mut state_axes = Vec::new();
        let mut has_ids = false;
        for (id, name, kind) in graph.inputs() {
            let ty = graph
                .ty(id)
                .tensor()
                .ok_or_else(|| Error::InvalidGraph(format!("input `{name}` has a tuple type")))?;
            match kind {
                InputKind::State => {
                    let shape = eval_dims(ty, &b)?;
                    let axis = growing_axis(ty);
                    let t = match axis {
                        Some(a) => Tensor::zeros_with_capacity(ty.dtype, &shape, a, positions),
                        None => Tensor::zeros(ty.dtype, &shape),
                    }
                    .map_err(|e| Error::InvalidGraph(format!("state `{name}`: {e}")))?;
                    state.insert(name.to_string(), t);
                    state_axes.push((name.to_string(), axis));
                }
                InputKind::Data if name == names::INPUT_IDS => has_ids = true,
                InputKind::Data if name == names::POSITION_IDS || name == names::ATTENTION_MASK => {
                }
                InputKind::Data => {
                    return Err(Error::InvalidGraph(format!(
                        "a decode session cannot feed data input `{name}`"
                    )))
                }
            }
        }
        if !has_ids {
            return Err(Error::InvalidGraph(format!(
                "the graph has no `{}` input",
                names::INPUT_IDS
            )));
        }
        let logits = graph.output(names::LOGITS).ok_or_else(|| {
            Error::InvalidGraph(format!("the graph has no `{}` output", names::LOGITS))
        })?;
        if graph.output(names::NEXT_TOKEN).is_none() {
            return Err(Error::InvalidGraph(format!(
                "the graph has no `{}` output",
                names::NEXT_TOKEN
            )));
        }
        let vocab = graph
            .ty(logits.value)
            .tensor()
            .and_then(|t| t.shape.last())
            .and_then(|d| d.as_fixed())
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| {
                Error::InvalidGraph("logits must end in a fixed vocabulary axis".into())
            })?;
        Ok(Session {
            exec,
            batch,
            past: 0,
            state,
            state_axes,
            vocab,
            profile: Profile::new(),
        })
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Positions cached so far.
    pub fn past_len(&self) -> usize {
        self.past
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Per-op-kind totals over every step run so far.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    pub fn executor(&self) -> &Executor {
        &self.exec
    }

    /// The current value of a state (a KV cache) by name.
    pub fn state(&self, name: &str) -> Option<&Tensor> {
        self.state.get(name)
    }

    /// Feeds one token per sequence at the next position. On error the session is
    /// unchanged.
    pub fn step(&mut self, tokens: &[i32]) -> Result<StepOutput, Error> {
        if tokens.len() != self.batch {
            return Err(bad(
                names::INPUT_IDS,
                format!("{} token(s) for a batch of {}", tokens.len(), self.batch),
            ));
        }
        let position = i32::try_from(self.past)
            .map_err(|_| bad(names::POSITION_IDS, "position overflows i32"))?;
        let b = bindings(self.batch, self.past);
        let data = self.data_inputs(tokens, position, &b)?;
        // The caches move into the step (see the module documentation).
        let mut inputs = std::mem::take(&mut self.state);
        inputs.extend(data);
        let out = match self.exec.run_restoring(&b, &mut inputs) {
            Ok(out) => out,
            Err(e) => {
                for (name, _) in &self.state_axes {
                    if let Some(t) = inputs.remove(name) {
                        self.state.insert(name.clone(), t);
                    }
                }
                return Err(e);
            }
        };
        let mut new_state = Vec::with_capacity(self.state_axes.len());
        let mut spent = Vec::with_capacity(out.outputs.len());
        let mut logits = Err(Error::InvalidGraph(format!(
            "output `{}` is missing or not a tensor",
            names::LOGITS
        )));
        let mut next = Err(Error::InvalidGraph(format!(
            "output `{}` is missing or not an i32 tensor",
            names::NEXT_TOKEN
        )));
        let mut bad_state = None;
        for (name, kind, value) in out.outputs {
            match (kind, value) {
                (OutputKind::State, Value::Tensor(t)) => new_state.push((name, t)),
                (OutputKind::State, _) => bad_state = Some(name),
                (OutputKind::Data, Value::Tensor(t)) if name == names::LOGITS => {
                    logits = Ok(t.to_vec_f32());
                    spent.push(Value::Tensor(t));
                }
                (OutputKind::Data, Value::Tensor(t)) if name == names::NEXT_TOKEN => {
                    next = t.to_vec_i32().ok_or_else(|| {
                        Error::InvalidGraph(format!("{} is not i32", names::NEXT_TOKEN))
                    });
                    spent.push(Value::Tensor(t));
                }
                (OutputKind::Data, v) => spent.push(v),
            }
        }
        spent.into_iter().for_each(exec::recycle);
        let checked = match (bad_state, logits, next) {
            (Some(name), _, _) => Err(Error::InvalidGraph(format!(
                "state `{name}` is not a tensor"
            ))),
            (None, Ok(l), Ok(n)) if l.len() == self.batch * self.vocab => Ok((l, n)),
            (None, Ok(l), Ok(_)) => Err(Error::InvalidGraph(format!(
                "logits hold {} values, expected {} x {}",
                l.len(),
                self.batch,
                self.vocab
            ))),
            (None, Err(e), _) | (None, _, Err(e)) => Err(e),
        };
        let (logits, next) = match checked {
            Ok(v) => v,
            Err(e) => {
                // The new caches begin with the old ones: their prefix is the state the
                // session had before the step.
                for (name, t) in new_state {
                    let axis = self
                        .state_axes
                        .iter()
                        .find(|(n, _)| *n == name)
                        .and_then(|(_, a)| *a);
                    let old = match axis {
                        Some(a) => t.slice(a, 0, self.past).unwrap_or(t),
                        None => t,
                    };
                    self.state.insert(name, old);
                }
                return Err(e);
            }
        };
        self.state.extend(new_state);
        self.past += 1;
        self.profile.add(&out.stats);
        Ok(StepOutput {
            logits: logits.chunks(self.vocab).map(<[f32]>::to_vec).collect(),
            next,
            stats: out.stats,
        })
    }

    /// The data inputs of one step: ids, positions and the all-zero mask.
    fn data_inputs(
        &self,
        tokens: &[i32],
        position: i32,
        b: &Bindings,
    ) -> Result<Vec<(String, Tensor)>, Error> {
        let graph = self.exec.graph();
        let mut data = Vec::new();
        for (id, name, kind) in graph.inputs() {
            if kind != InputKind::Data {
                continue;
            }
            let ty = graph
                .ty(id)
                .tensor()
                .ok_or_else(|| Error::InvalidGraph(format!("input `{name}` has a tuple type")))?;
            let shape = eval_dims(ty, b)?;
            let numel: usize = shape.iter().product();
            let tensor = match name {
                names::INPUT_IDS | names::POSITION_IDS if numel != self.batch => {
                    return Err(Error::InvalidGraph(format!(
                        "input `{name}` is {ty}, not one id per sequence"
                    )))
                }
                names::INPUT_IDS => Tensor::from_i32(&shape, tokens.to_vec()),
                names::POSITION_IDS => Tensor::from_i32(&shape, vec![position; numel]),
                _ => Tensor::zeros(ty.dtype, &shape),
            }
            .map_err(|e| Error::InvalidGraph(format!("input `{name}`: {e}")))?;
            data.push((name.to_string(), tensor));
        }
        Ok(data)
    }

    /// Prefills one prompt per sequence (all of one length) and greedily generates
    /// `new_tokens` tokens per sequence, without stopping at an end-of-sequence id.
    pub fn generate(
        &mut self,
        prompts: &[Vec<i32>],
        new_tokens: usize,
    ) -> Result<Generation, Error> {
        self.decode(prompts, new_tokens, None)
    }

    /// Teacher forcing: prefills the prompts, then feeds `forced[s]` to sequence `s`
    /// one token per step instead of its own predictions, so that a run in another
    /// precision sees the same inputs as a reference run. The result holds
    /// `forced[s].len() + 1` logits rows per sequence (row 0 at the last prompt
    /// position, row `i` after feeding `forced[s][i - 1]`) and, as `generated`, the
    /// greedy prediction of each row.
    pub fn generate_forced(
        &mut self,
        prompts: &[Vec<i32>],
        forced: &[Vec<i32>],
    ) -> Result<Generation, Error> {
        if forced.len() != self.batch {
            return Err(bad(
                names::INPUT_IDS,
                format!(
                    "{} forced sequence(s) for a batch of {}",
                    forced.len(),
                    self.batch
                ),
            ));
        }
        let n = forced[0].len();
        if forced.iter().any(|f| f.len() != n) {
            return Err(bad(
                names::INPUT_IDS,
                "forced sequences must be of one length",
            ));
        }
        self.decode(prompts, n + 1, Some(forced))
    }

    fn decode(
        &mut self,
        prompts: &[Vec<i32>],
        new_tokens: usize,
        forced: Option<&[Vec<i32>]>,
    ) -> Result<Generation, Error> {
        if prompts.len() != self.batch {
            return Err(bad(
                names::INPUT_IDS,
                format!("{} prompt(s) for a batch of {}", prompts.len(), self.batch),
            ));
        }
        let len = prompts[0].len();
        if len == 0 || prompts.iter().any(|p| p.len() != len) {
            return Err(bad(
                names::INPUT_IDS,
                "prompts must be non-empty and of one length",
            ));
        }
        let mut gen = Generation {
            generated: vec![Vec::with_capacity(new_tokens); self.batch],
            logits: vec![Vec::with_capacity(new_tokens); self.batch],
            batch: self.batch,
            ..Generation::default()
        };
        if new_tokens == 0 {
            return Ok(gen);
        }
        let record = |gen: &mut Generation, out: &StepOutput| {
            gen.steps += 1;
            gen.launches_per_step = out.stats.launches;
            gen.bytes += out.stats.bytes();
            gen.elapsed += out.stats.time;
        };
        let keep = |gen: &mut Generation, out: StepOutput| {
            for (s, row) in out.logits.into_iter().enumerate() {
                gen.logits[s].push(row);
            }
            for (s, &t) in out.next.iter().enumerate() {
                gen.generated[s].push(t);
            }
        };
        let mut tokens = Vec::with_capacity(self.batch);
        for pos in 0..len {
            tokens.clear();
            tokens.extend(prompts.iter().map(|p| p[pos]));
            let out = self.step(&tokens)?;
            record(&mut gen, &out);
            if pos + 1 == len {
                keep(&mut gen, out);
            }
        }
        for i in 1..new_tokens {
            tokens.clear();
            match forced {
                Some(f) => tokens.extend(f.iter().map(|seq| seq[i - 1])),
                None => tokens.extend(gen.generated.iter().map(|g| g[i - 1])),
            }
            let out = self.step(&tokens)?;
            record(&mut gen, &out);
            keep(&mut gen, out);
        }
        Ok(gen)
    }
}

/// The bindings of a step: `batch` sequences with `past` cached positions.
pub fn bindings(batch: usize, past: usize) -> Bindings {
    Bindings::new()
        .with(names::BATCH, batch as u64)
        .with(names::PAST, past as u64)
}
