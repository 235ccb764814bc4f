//! Greedy decoding: a [`Session`] feeds a decode-step graph one token per sequence per
//! step and carries its state (the KV cache) from step to step.
//!
//! The session drives any graph with the decode interface of
//! `fusec_ir::step`: data inputs `input_ids` `[B,1]` (required),
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
//! as large (a step that does so moves more bytes than the cost model predicts). An
//! FP8 E4M3 cache that only `fused.decode_attention` reads (every cache of an FP8
//! graph lowered by `fusec_rewrite::precision`) is stored compactly, one byte per
//! value, so that attention streams the bytes the IR says it does; any other cache
//! holds `f32` values, which every kernel reads. The stored values are the same
//! either way ([`Session::with_cache_storage`] chooses), and so are the results. The
//! session hands its caches to the executor by value and gets the new ones back, so it
//! never holds a second handle on a buffer the step appends to.
//!
//! [`Session::step_into`] allocates nothing in steady state: the inputs live in a
//! vector indexed by the graph's input positions (no key is ever rebuilt), the data
//! inputs' buffers come from the executor's pool and go back to it, the bindings are
//! updated in place, and the logits, tokens and statistics are written into a
//! [`StepOutput`] the caller keeps from step to step.

use std::sync::Arc;
use std::time::Duration;

use fusec_ir::shape::Bindings;
use fusec_ir::step;
use fusec_ir::{DType, FusedOp, Graph, InputKind, NodeId, Op, OutputKind, TensorType};
use ndarray::{Array2, Array3, ArrayView2, Axis};

use crate::error::Error;
use crate::exec::{self, Executor, RunOutput, Value};
use crate::pool;
use crate::profile::{Profile, StepStats};
use crate::tensor::Tensor;

/// One step's results. Kept from step to step and handed to [`Session::step_into`],
/// its vectors keep their capacity.
#[derive(Clone, Debug, Default)]
pub struct StepOutput {
    /// The logits of each sequence, `[batch, vocab]`.
    pub logits: Array2<f32>,
    /// The greedy next token of each sequence.
    pub next: Vec<i32>,
    pub stats: StepStats,
}

/// The result of [`Session::generate`].
#[derive(Clone, Debug, Default)]
pub struct Generation {
    /// Generated ids, `[sequence][token]`.
    pub generated: Vec<Vec<i32>>,
    /// Logits, `[sequence, token, vocab]`: token 0 is the output at the last prompt
    /// position, token `i` the output of feeding generated token `i - 1`.
    pub logits: Array3<f32>,
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
    /// The logits of sequence `seq`, `[token, vocab]` (empty when there is no such
    /// sequence).
    pub fn sequence(&self, seq: usize) -> ArrayView2<'_, f32> {
        if seq < self.logits.dim().0 {
            self.logits.index_axis(Axis(0), seq)
        } else {
            ArrayView2::from(&[[0.0f32; 0]; 0])
        }
    }

    /// The logits rows of sequence `seq`, token by token, as slices.
    pub fn rows(&self, seq: usize) -> impl Iterator<Item = &[f32]> + '_ {
        (0..self.logits.dim().1).map(move |token| self.row(seq, token))
    }

    /// The logits of sequence `seq` at token `token` (see [`Generation::logits`]);
    /// empty when there is no such row.
    pub fn row(&self, seq: usize, token: usize) -> &[f32] {
        if seq >= self.logits.dim().0 || token >= self.logits.dim().1 {
            return &[];
        }
        let (_, tokens, vocab) = self.logits.dim();
        let start = (seq * tokens + token) * vocab;
        self.logits
            .as_slice()
            .and_then(|all| all.get(start..start + vocab))
            .unwrap_or(&[])
    }

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
    pub(crate) batch: usize,
    /// Positions cached so far.
    pub(crate) past: usize,
    /// The step's inputs by their position among the graph's inputs
    /// (`Executor::input_names`): the states (KV caches) between steps, and during a
    /// step the data inputs too.
    pub(crate) inputs: Vec<Option<Tensor>>,
    /// The states, at their input positions.
    pub(crate) states: Vec<State>,
    /// The data inputs fed every step, at their input positions.
    data: Vec<DataInput>,
    pub(crate) vocab: usize,
    pub(crate) profile: Profile,
    /// `B` and `S`, updated in place every step.
    bindings: Bindings,
    /// The executor's outputs, kept for the capacity of their lists.
    run: RunOutput,
}

/// A state input, carried from the output of the same name to the next step.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) index: usize,
    pub(crate) name: Arc<str>,
    /// The axis that grows by one position per step, if any.
    pub(crate) axis: Option<usize>,
    /// The sliding window of a ring-buffer cache: it stops growing at this many
    /// positions and the oldest are overwritten.
    pub(crate) window: Option<usize>,
}

/// What a data input holds.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Feed {
    /// This step's token of each sequence.
    Ids,
    /// This step's position, for each sequence.
    Positions,
    /// The additive attention mask: all zeros.
    Mask,
}

/// A data input the session makes every step.
#[derive(Debug)]
struct DataInput {
    index: usize,
    feed: Feed,
    ty: TensorType,
}

pub(crate) fn bad(name: &str, message: impl Into<String>) -> Error {
    Error::BadInput {
        name: name.to_string(),
        message: message.into(),
    }
}

/// The axis of a state type that holds the cached positions (the one sized by `S`,
/// or by `min(S, W)` for a sliding window's ring), and the ring's window.
fn growing_axis(ty: &TensorType) -> (Option<usize>, Option<usize>) {
    let dims = ty.shape.dims();
    let axis = dims.iter().position(|d| d.symbol() == Some(step::PAST));
    let window = axis
        .and_then(|a| dims[a].window())
        .and_then(|w| usize::try_from(w).ok());
    (axis, window)
}

/// Whether every reader of the state input `id` is a `fused.decode_attention` that
/// takes it as a cache (operand 5 or 6), the one kernel that reads caches in compact
/// storage; any other reader (an unfused graph's `cat`, say) needs `f32` values.
fn only_decode_attention_reads(graph: &Graph, id: NodeId) -> bool {
    graph.users(id).into_iter().all(|user| {
        matches!(
            graph.op(user),
            Op::Fused(FusedOp::DecodeAttention | FusedOp::DecodeAttentionCapped)
        ) && graph
            .operands(user)
            .iter()
            .enumerate()
            .all(|(i, &o)| o != id || i == 5 || i == 6)
    })
}

impl Session {
    /// A session decoding `batch` sequences with empty caches, with room for
    /// [`DEFAULT_CAPACITY`] positions before a cache has to grow.
    pub fn new(exec: Executor, batch: usize) -> Result<Session, Error> {
        Session::with_capacity(exec, batch, DEFAULT_CAPACITY)
    }

    /// A session whose caches have room for `positions` positions (prompt plus
    /// generated tokens) before they have to grow. E4M3 caches that only decode
    /// attention reads are stored compactly (see the module documentation).
    pub fn with_capacity(exec: Executor, batch: usize, positions: usize) -> Result<Session, Error> {
        Session::with_cache_storage(exec, batch, positions, true)
    }

    /// [`Session::with_capacity`], with E4M3 caches stored compactly (one byte per
    /// value) where `compact` allows it and as `f32` values otherwise. Both give the
    /// same results bit for bit; `f32` storage reads four times the bytes.
    pub fn with_cache_storage(
        exec: Executor,
        batch: usize,
        positions: usize,
        compact: bool,
    ) -> Result<Session, Error> {
        if batch == 0 {
            return Err(bad("batch", "must be at least 1"));
        }
        let graph = exec.graph();
        let b = bindings(batch, 0);
        let mut inputs = Vec::new();
        let mut states = Vec::new();
        let mut data = Vec::new();
        let mut has_ids = false;
        for (index, (id, name, kind)) in graph.inputs().into_iter().enumerate() {
            let ty = graph
                .ty(id)
                .tensor()
                .ok_or_else(|| Error::InvalidGraph(format!("input `{name}` has a tuple type")))?;
            let feed = |feed| DataInput {
                index,
                feed,
                ty: ty.clone(),
            };
            match kind {
                InputKind::State => {
                    let shape = exec::dims(&ty.shape, &b)?;
                    let (axis, window) = growing_axis(ty);
                    // A ring never holds more than its window.
                    let room = window.map_or(positions, |w| positions.min(w));
                    let t = match axis {
                        Some(a) => Tensor::zeros_with_capacity(ty.dtype, &shape, a, room),
                        None => Tensor::zeros(ty.dtype, &shape),
                    }
                    .map_err(|e| Error::InvalidGraph(format!("state `{name}`: {e}")))?;
                    let t = match compact && only_decode_attention_reads(graph, id) {
                        true => t.to_compact_storage().unwrap_or(t),
                        false => t,
                    };
                    inputs.push(Some(t));
                    states.push(State {
                        index,
                        name: Arc::from(name),
                        axis,
                        window,
                    });
                    continue;
                }
                InputKind::Data if name == step::INPUT_IDS => {
                    has_ids = true;
                    data.push(feed(Feed::Ids));
                }
                InputKind::Data if name == step::POSITION_IDS => data.push(feed(Feed::Positions)),
                InputKind::Data if step::is_attention_mask(name) => data.push(feed(Feed::Mask)),
                InputKind::Data => {
                    return Err(Error::InvalidGraph(format!(
                        "a decode session cannot feed data input `{name}`"
                    )))
                }
            }
            inputs.push(None);
        }
        if !has_ids {
            return Err(Error::InvalidGraph(format!(
                "the graph has no `{}` input",
                step::INPUT_IDS
            )));
        }
        let logits = graph.output(step::LOGITS).ok_or_else(|| {
            Error::InvalidGraph(format!("the graph has no `{}` output", step::LOGITS))
        })?;
        if graph.output(step::NEXT_TOKEN).is_none() {
            return Err(Error::InvalidGraph(format!(
                "the graph has no `{}` output",
                step::NEXT_TOKEN
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
            inputs,
            states,
            data,
            vocab,
            profile: Profile::new(),
            bindings: b,
            run: RunOutput::new(),
        })
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Positions cached so far.
    pub fn past_len(&self) -> usize {
        self.past
    }

    /// Forgets every cached position from `positions` on, as if only the first
    /// `positions` tokens had been decoded: each cache becomes a shorter view of its
    /// buffer, without copying, and the next step appends in place after it. Used to
    /// decode the same continuation again (a benchmark's repeated rounds; a rejected
    /// speculative draft).
    pub fn rewind(&mut self, positions: usize) -> Result<(), Error> {
        if positions > self.past {
            return Err(bad(
                "positions",
                format!(
                    "cannot rewind {} cached positions to {positions}",
                    self.past
                ),
            ));
        }
        // A ring that has wrapped holds no prefix of the sequence to rewind to.
        for state in &self.states {
            if let Some(w) = state.window.filter(|&w| self.past > w) {
                return Err(bad(
                    &state.name,
                    format!(
                        "its sliding window's ring has overwritten the positions before {}; cannot rewind to {positions}",
                        self.past - w
                    ),
                ));
            }
        }
        for state in &self.states {
            let Some(axis) = state.axis else {
                return Err(bad(&state.name, "has no position axis to rewind"));
            };
            if let Some(t) = self.inputs[state.index].as_mut() {
                *t = t
                    .slice(axis, 0, positions)
                    .map_err(|e| bad(&state.name, e.to_string()))?;
            }
        }
        self.past = positions;
        Ok(())
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
        let s = self.states.iter().find(|s| &*s.name == name)?;
        self.inputs.get(s.index)?.as_ref()
    }

    /// Feeds one token per sequence at the next position. On error the session is
    /// unchanged.
    pub fn step(&mut self, tokens: &[i32]) -> Result<StepOutput, Error> {
        let mut out = StepOutput::default();
        self.step_into(tokens, &mut out)?;
        Ok(out)
    }

    /// Feeds one token per sequence at the next position, like [`Session::step`], and
    /// writes the results into `out`, replacing what it held. With `out` kept from
    /// step to step, a steady-state step allocates nothing (see the module
    /// documentation). On error the session is unchanged and `out` is unspecified.
    pub fn step_into(&mut self, tokens: &[i32], out: &mut StepOutput) -> Result<(), Error> {
        if tokens.len() != self.batch {
            return Err(bad(
                step::INPUT_IDS,
                format!("{} token(s) for a batch of {}", tokens.len(), self.batch),
            ));
        }
        let position = i32::try_from(self.past)
            .map_err(|_| bad(step::POSITION_IDS, "position overflows i32"))?;
        self.bindings.set(step::PAST, self.past as u64);
        if let Err(e) = self.feed(tokens, position) {
            self.drop_data();
            return Err(e);
        }
        // The caches move into the step (see the module documentation); a failed step
        // puts every input back.
        let result = self
            .exec
            .run_into(&self.bindings, &mut self.inputs, &mut self.run);
        self.drop_data();
        result?;
        if let Err(e) = self.check_outputs() {
            // The new caches begin with the old ones: their prefix is the state the
            // session had before the step.
            for (name, kind, value) in self.run.outputs.drain(..) {
                let state = self.states.iter().find(|s| s.name == name);
                match (kind, value, state) {
                    (OutputKind::State, Value::Tensor(t), Some(s)) => {
                        let old = match s.axis {
                            Some(a) => t.slice(a, 0, self.past).unwrap_or(t),
                            None => t,
                        };
                        self.inputs[s.index] = Some(old);
                    }
                    (_, v, _) => exec::recycle(v),
                }
            }
            return Err(e);
        }
        if out.logits.dim() != (self.batch, self.vocab) {
            // Only the first step into this output allocates.
            out.logits = Array2::zeros((self.batch, self.vocab));
        }
        out.next.clear();
        for (name, kind, value) in self.run.outputs.drain(..) {
            let state = self.states.iter().find(|s| s.name == name);
            match (kind, value, state) {
                (OutputKind::State, Value::Tensor(t), Some(s)) => {
                    self.inputs[s.index] = Some(t);
                }
                (OutputKind::Data, Value::Tensor(t), _) if &*name == step::LOGITS => {
                    if let (Some(values), Some(rows)) =
                        (t.contiguous_f32(), out.logits.as_slice_mut())
                    {
                        let n = values.len().min(rows.len());
                        rows[..n].copy_from_slice(&values[..n]);
                    }
                    exec::recycle(Value::Tensor(t));
                }
                (OutputKind::Data, Value::Tensor(t), _) if &*name == step::NEXT_TOKEN => {
                    match (t.is_contiguous(), t.i32_buffer()) {
                        (true, Some(ids)) => {
                            out.next
                                .extend_from_slice(&ids[t.offset()..t.offset() + t.numel()]);
                        }
                        _ => out.next.extend(t.to_vec_i32().unwrap_or_default()),
                    }
                    exec::recycle(Value::Tensor(t));
                }
                (_, v, _) => exec::recycle(v),
            }
        }
        // The step's statistics trade places with the caller's old ones, whose list
        // the next step fills.
        std::mem::swap(&mut out.stats, &mut self.run.stats);
        self.past += 1;
        self.profile.add(&out.stats);
        Ok(())
    }

    /// Makes this step's data inputs (ids, positions and the all-zero mask) in their
    /// input slots, in buffers from the pool.
    fn feed(&mut self, tokens: &[i32], position: i32) -> Result<(), Error> {
        for d in &self.data {
            let name = &self.exec.input_names()[d.index];
            let shape = exec::dims(&d.ty.shape, &self.bindings)?;
            let numel: usize = shape.iter().product();
            let tensor = match d.feed {
                Feed::Ids | Feed::Positions if numel != self.batch || d.ty.dtype != DType::I32 => {
                    return Err(Error::InvalidGraph(format!(
                        "input `{name}` is {}, not one i32 id per sequence",
                        d.ty
                    )))
                }
                Feed::Ids => {
                    let mut ids = pool::take(numel);
                    ids.extend_from_slice(tokens);
                    Tensor::from_kernel_i32(shape, ids)
                }
                Feed::Positions => {
                    let mut ids = pool::take(numel);
                    ids.resize(numel, position);
                    Tensor::from_kernel_i32(shape, ids)
                }
                Feed::Mask if d.ty.dtype == DType::I32 => {
                    Tensor::from_kernel_i32(shape, pool::zeros(numel))
                }
                Feed::Mask => Tensor::from_kernel_f32(d.ty.dtype, shape, pool::zeros(numel)),
            };
            self.inputs[d.index] = Some(tensor);
        }
        Ok(())
    }

    /// Empties the data inputs' slots (whatever a step left there), returning their
    /// buffers to the pool.
    fn drop_data(&mut self) {
        for d in &self.data {
            if let Some(t) = self.inputs[d.index].take() {
                exec::recycle(Value::Tensor(t));
            }
        }
    }

    /// Checks the step's outputs before any of them is taken: every state a tensor,
    /// the logits `batch x vocab` floats, the next tokens one `i32` per sequence.
    fn check_outputs(&self) -> Result<(), Error> {
        let outputs = &self.run.outputs;
        if let Some((name, _, _)) = outputs
            .iter()
            .find(|(_, kind, v)| *kind == OutputKind::State && !matches!(v, Value::Tensor(_)))
        {
            return Err(Error::InvalidGraph(format!(
                "state `{name}` is not a tensor"
            )));
        }
        let data = |name: &str| {
            outputs
                .iter()
                .find(|(n, kind, _)| *kind == OutputKind::Data && &**n == name)
                .and_then(|(_, _, v)| v.tensor())
        };
        let logits = data(step::LOGITS).ok_or_else(|| {
            Error::InvalidGraph(format!(
                "output `{}` is missing or not a tensor",
                step::LOGITS
            ))
        })?;
        let next = data(step::NEXT_TOKEN)
            .filter(|t| t.dtype() == DType::I32)
            .ok_or_else(|| {
                Error::InvalidGraph(format!(
                    "output `{}` is missing or not an i32 tensor",
                    step::NEXT_TOKEN
                ))
            })?;
        if logits.f32_buffer().is_none() || logits.numel() != self.batch * self.vocab {
            return Err(Error::InvalidGraph(format!(
                "logits hold {} values, expected {} x {}",
                logits.numel(),
                self.batch,
                self.vocab
            )));
        }
        if next.numel() != self.batch {
            return Err(Error::InvalidGraph(format!(
                "{} holds {} values, expected {}",
                step::NEXT_TOKEN,
                next.numel(),
                self.batch
            )));
        }
        Ok(())
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
                step::INPUT_IDS,
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
                step::INPUT_IDS,
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
        self.check_prompts(prompts)?;
        if new_tokens == 0 {
            return Ok(self.no_generation());
        }
        // The prompt token by token through the decode graph (no prefill graph).
        let fed = self.prefill_prompts(&mut [], prompts)?;
        self.decode_after(fed, new_tokens, forced)
    }

    /// A generation of no tokens.
    pub(crate) fn no_generation(&self) -> Generation {
        Generation {
            logits: Array3::zeros((self.batch, 0, self.vocab)),
            generated: vec![Vec::new(); self.batch],
            batch: self.batch,
            ..Generation::default()
        }
    }
}

/// A non-finite result found by the executor's finiteness check, with the decode step
/// (counted from 1) it happened in; other errors as they are.
pub(crate) fn at_step(e: Error, step: u64) -> Error {
    match e {
        Error::Node {
            node,
            op,
            kernel: crate::kernels::KernelError::NonFinite { index, value },
        } => Error::NonFiniteValue {
            step,
            node,
            op,
            index,
            value,
        },
        other => other,
    }
}

/// The bindings of a step: `batch` sequences with `past` cached positions.
pub fn bindings(batch: usize, past: usize) -> Bindings {
    step::bindings(batch as u64, past as u64)
}
