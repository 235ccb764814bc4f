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

use std::collections::HashMap;
use std::time::Duration;

use fusec_ir::build::names;
use fusec_ir::shape::Bindings;
use fusec_ir::{InputKind, OutputKind, TensorType};

use crate::error::Error;
use crate::exec::{self, Executor, Value};
use crate::pool;
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

/// A decoding session over one executor. See the module documentation.
#[derive(Debug)]
pub struct Session {
    exec: Executor,
    batch: usize,
    /// Positions cached so far.
    past: usize,
    state: HashMap<String, Tensor>,
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

impl Session {
    /// A session decoding `batch` sequences with empty caches.
    pub fn new(exec: Executor, batch: usize) -> Result<Session, Error> {
        if batch == 0 {
            return Err(bad("batch", "must be at least 1"));
        }
        let graph = exec.graph();
        let b = bindings(batch, 0);
        let mut state = HashMap::new();
        let mut has_ids = false;
        for (id, name, kind) in graph.inputs() {
            let ty = graph
                .ty(id)
                .tensor()
                .ok_or_else(|| Error::InvalidGraph(format!("input `{name}` has a tuple type")))?;
            match kind {
                InputKind::State => {
                    let t = Tensor::zeros(ty.dtype, &eval_dims(ty, &b)?)
                        .map_err(|e| Error::InvalidGraph(format!("state `{name}`: {e}")))?;
                    state.insert(name.to_string(), t);
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
        let mut inputs: HashMap<String, Tensor> = self.state.clone();
        let graph = self.exec.graph();
        for (id, name, kind) in graph.inputs() {
            if kind != InputKind::Data {
                continue;
            }
            let ty = graph
                .ty(id)
                .tensor()
                .ok_or_else(|| Error::InvalidGraph(format!("input `{name}` has a tuple type")))?;
            let shape = eval_dims(ty, &b)?;
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
            inputs.insert(name.to_string(), tensor);
        }
        let out = self.exec.run(&b, inputs)?;
        let tensor_out = |name: &str| {
            out.get(name).and_then(Value::tensor).ok_or_else(|| {
                Error::InvalidGraph(format!("output `{name}` is missing or not a tensor"))
            })
        };
        let logits = tensor_out(names::LOGITS)?.to_vec_f32();
        if logits.len() != self.batch * self.vocab {
            return Err(Error::InvalidGraph(format!(
                "logits hold {} values, expected {} x {}",
                logits.len(),
                self.batch,
                self.vocab
            )));
        }
        let next = tensor_out(names::NEXT_TOKEN)?
            .to_vec_i32()
            .ok_or_else(|| Error::InvalidGraph("next_token is not i32".into()))?;
        let mut new_state = Vec::with_capacity(self.state.len());
        let mut spent = Vec::with_capacity(out.outputs.len());
        for (name, kind, value) in out.outputs {
            match (kind, value) {
                (OutputKind::State, Value::Tensor(t)) => new_state.push((name, t)),
                (OutputKind::State, _) => {
                    return Err(Error::InvalidGraph(format!(
                        "state `{name}` is not a tensor"
                    )))
                }
                (OutputKind::Data, v) => spent.push(v),
            }
        }
        // Commit: the previous caches and this step's data outputs are dead, and
        // their buffers serve the next step.
        for (name, t) in new_state {
            if let Some(old) = self.state.insert(name, t) {
                pool::recycle(old);
            }
        }
        spent.into_iter().for_each(exec::recycle);
        self.past += 1;
        self.profile.add(&out.stats);
        Ok(StepOutput {
            logits: logits.chunks(self.vocab).map(<[f32]>::to_vec).collect(),
            next,
            stats: out.stats,
        })
    }

    /// Prefills one prompt per sequence (all of one length) and greedily generates
    /// `new_tokens` tokens per sequence, without stopping at an end-of-sequence id.
    pub fn generate(
        &mut self,
        prompts: &[Vec<i32>],
        new_tokens: usize,
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
        let record = |gen: &mut Generation, out: StepOutput| -> Vec<i32> {
            gen.steps += 1;
            gen.launches_per_step = out.stats.launches;
            gen.bytes += out.stats.bytes();
            gen.elapsed += out.stats.time;
            out.next
        };
        let mut tokens = Vec::with_capacity(self.batch);
        for pos in 0..len {
            tokens.clear();
            tokens.extend(prompts.iter().map(|p| p[pos]));
            let out = self.step(&tokens)?;
            if pos + 1 == len {
                for (s, row) in out.logits.iter().enumerate() {
                    gen.logits[s].push(row.clone());
                }
                let next = record(&mut gen, out);
                for (s, &t) in next.iter().enumerate() {
                    gen.generated[s].push(t);
                }
                tokens = next;
            } else {
                record(&mut gen, out);
            }
        }
        for _ in 1..new_tokens {
            let out = self.step(&tokens)?;
            for (s, row) in out.logits.iter().enumerate() {
                gen.logits[s].push(row.clone());
            }
            tokens = record(&mut gen, out);
            for (s, &t) in tokens.iter().enumerate() {
                gen.generated[s].push(t);
            }
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
