//! Running a launch plan on a device: the plan's contract, executed.
//!
//! A [`Runner`] allocates every buffer of a [`LaunchPlan`] on a [`Device`], uploads
//! the weights (converted to their dtypes) and the load-time constants, and runs one
//! decode step per [`Runner::step`]: it uploads the token ids and positions, launches
//! the kernels in order with the cached length `S` as their last argument, swaps the
//! KV-cache buffers that the step did not update in place, and reads the logits and
//! the greedy tokens back.
//!
//! A paged step's plan (a graph of `fusec_model::blocks::StepDims::paged`) runs with
//! [`Runner::step_paged`] instead: the caller gives every row's token, position and
//! block table rows (the host side of Kwon et al. 2023's PagedAttention, as
//! `fusec_exec::PagedSession` keeps it), and the pools are updated in place.
//!
//! The device is a trait so that the same runner drives a CUDA GPU (this crate's
//! `gpu` module) and, in the tests, a CPU emulation of the kernels. Devices deal in raw
//! addresses: the arena's intermediates are offsets into one allocation.

use fusec_ir::step;
use fusec_ir::{numerics, DType};
use half::{bf16, f16};

use fusec_codegen::plan::{Arg, Binding, BufferKind, ConstantInit, LaunchPlan, ViewInfo};
use fusec_codegen::Output;
use fusec_weights::Weights;

/// Why a plan could not run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RunError {
    /// The device failed (a driver or library error), with its message.
    #[error("device: {0}")]
    Device(String),
    /// A weight the plan needs is missing or has the wrong shape.
    #[error("weight `{name}`: {message}")]
    Weight { name: String, message: String },
    /// The step's inputs do not fit the plan.
    #[error("input `{name}`: {message}")]
    Input { name: String, message: String },
    /// The plan asks for something the runner cannot provide.
    #[error("the plan cannot run: {0}")]
    Plan(String),
}

/// What a runner needs from a device. Addresses are device addresses (`CUdeviceptr`
/// on CUDA); every allocation is zeroed.
pub trait Device {
    /// Allocates `bytes` zeroed bytes, aligned to 256.
    fn alloc(&mut self, bytes: u64) -> Result<u64, RunError>;
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), RunError>;
    fn read(&mut self, addr: u64, len: usize) -> Result<Vec<u8>, RunError>;
    /// Compiles and loads the translation unit holding the plan's kernels.
    fn load(&mut self, output: &Output) -> Result<(), RunError>;
    /// Launches `kernel`: `args` are the pointer arguments in order; `past` (the `S`
    /// argument) comes last.
    fn launch(
        &mut self,
        kernel: &str,
        grid: [u32; 3],
        block: [u32; 3],
        shared: u32,
        args: &[u64],
        past: i32,
    ) -> Result<(), RunError>;
    /// Waits for the launched work.
    fn sync(&mut self) -> Result<(), RunError>;
}

/// The weights a runner uploads, by name.
pub trait WeightSource {
    /// The values of weight `name` as `dtype`, shaped `dims` (row-major), encoded as
    /// the device stores them (see [`encode`]).
    fn bytes(&self, name: &str, dtype: DType, dims: &[u64]) -> Result<Vec<u8>, RunError>;
}

/// `values` in the little-endian byte encoding of `dtype`: floats round to nearest
/// even, FP8 saturating to its largest finite value as CUDA's `__NV_SATFINITE` does.
pub fn encode(dtype: DType, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size_bytes() as usize);
    if dtype.is_nibbles() {
        // Two codes a byte in GGUF's Q4_0/Q4_1 block order
        // (`fusec_weights::tensor::nibble_code`): `i4` codes offset by 8.
        let offset = if dtype == DType::I4 { 8 } else { 0 };
        let nibble = |v: f32| (numerics::round_to(dtype, v) as i8 + offset) as u8;
        for block in values.chunks(32) {
            let at = |j: usize| block.get(j).copied().map_or(offset as u8, nibble);
            out.extend((0..16).map(|j| at(j) | (at(j + 16) << 4)));
        }
        return out;
    }
    for &v in values {
        match dtype {
            DType::F32 => out.extend_from_slice(&v.to_le_bytes()),
            DType::I32 => out.extend_from_slice(&(v as i32).to_le_bytes()),
            DType::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
            DType::Bf16 => out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
            DType::Fp8E4M3 => out.push(float8::F8E4M3::from_f32(v).to_bits()),
            DType::Fp8E5M2 => out.push(float8::F8E5M2::from_f32(v).to_bits()),
            DType::I8 => out.push(numerics::round_to(DType::I8, v) as i8 as u8),
            DType::U8 => out.push(numerics::round_to(DType::U8, v) as u8),
            DType::I4 | DType::U4 => {}
        }
    }
    out
}

/// The values of `bytes` encoded as `dtype`.
pub fn decode(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    if dtype.is_nibbles() {
        let codes = bytes.len() / 16 * 32;
        return (0..codes)
            .map(|i| f32::from(fusec_weights::tensor::nibble_code(dtype, bytes, i)))
            .collect();
    }
    let n = dtype.size_bytes() as usize;
    bytes
        .chunks_exact(n)
        .map(|c| match dtype {
            DType::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            DType::I32 => i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32,
            DType::F16 => f16::from_le_bytes([c[0], c[1]]).to_f32(),
            DType::Bf16 => bf16::from_le_bytes([c[0], c[1]]).to_f32(),
            DType::Fp8E4M3 => float8::F8E4M3::from_bits(c[0]).to_f32(),
            DType::Fp8E5M2 => float8::F8E5M2::from_bits(c[0]).to_f32(),
            DType::I8 => f32::from(c[0] as i8),
            DType::U8 => f32::from(c[0]),
            DType::I4 | DType::U4 => 0.0,
        })
        .collect()
}

/// RoPE inverse frequencies as the IR's `rope.inv_freq` defines them, in f32.
pub fn rope_inv_freq(theta: f64, head_dim: u64) -> Vec<f32> {
    let base = theta as f32;
    (0..head_dim / 2)
        .map(|j| 1.0 / base.powf((2 * j) as f32 / head_dim as f32))
        .collect()
}

/// One step's results.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// Logits per sequence.
    pub logits: Vec<Vec<f32>>,
    /// The greedy next token per sequence.
    pub next: Vec<i32>,
}

/// One paged step's data inputs, one entry per row of the plan's batch. Rows are
/// independent: one sequence may take several rows at consecutive positions (a prompt
/// chunk), each with a copy of the sequence's table rows.
#[derive(Clone, Copy, Debug)]
pub struct PagedInputs<'a> {
    pub tokens: &'a [i32],
    pub positions: &'a [i32],
    /// Every block table input of the plan (`block_table`, `block_table.windowW`) by
    /// name, row-major `[B, M]`; `-1` (or any id outside the pool) for no block.
    pub tables: &'a [(&'a str, &'a [i32])],
}

/// Runs a plan step by step on a device. See the module documentation.
#[derive(Debug)]
pub struct Runner<D: Device> {
    device: D,
    plan: LaunchPlan,
    /// The device address of every buffer.
    addr: Vec<u64>,
    /// Positions cached so far.
    past: u64,
}

/// The value of an extent as the plan writes it (`16`, `S`, `S+1`, or a sliding
/// window's `min(S+1,8)`) for `S = past`.
fn extent(d: &str, past: u64) -> Option<u64> {
    if let Some(inner) = d.strip_prefix("min(").and_then(|r| r.strip_suffix(')')) {
        let (len, window) = inner.split_once(',')?;
        return Some(extent(len, past)?.min(window.parse().ok()?));
    }
    match d.strip_prefix('S') {
        Some("") => Some(past),
        Some(rest) => rest
            .strip_prefix('+')?
            .parse::<u64>()
            .ok()
            .map(|k| past + k),
        None => d.parse().ok(),
    }
}

/// The element offsets of a view's elements in row-major order, for `S = past`.
fn offsets(v: &ViewInfo, past: u64) -> Result<Vec<u64>, RunError> {
    let dims: Vec<u64> = v
        .shape
        .iter()
        .map(|d| extent(d, past).ok_or_else(|| RunError::Plan(format!("dimension `{d}`"))))
        .collect::<Result<_, _>>()?;
    let n: u64 = dims.iter().product();
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n {
        let (mut r, mut off) = (i, v.offset);
        for (d, s) in dims.iter().zip(&v.strides).rev() {
            off += (r % d) * s;
            r /= d;
        }
        out.push(off);
    }
    Ok(out)
}

impl<D: Device> Runner<D> {
    /// Allocates and fills every buffer and loads the kernels.
    pub fn new(
        mut device: D,
        output: &Output,
        weights: &dyn WeightSource,
    ) -> Result<Runner<D>, RunError> {
        let plan = output.plan.clone();
        device.load(output)?;
        let arena = device.alloc(plan.arena_bytes.max(256))?;
        let mut addr = Vec::with_capacity(plan.buffers.len());
        for b in &plan.buffers {
            let a = match b.arena_offset {
                Some(o) => arena + o,
                None => device.alloc(b.bytes.max(1))?,
            };
            match &b.kind {
                BufferKind::Weight { name } => {
                    let bytes = weights.bytes(name, b.dtype, &b.dims)?;
                    if bytes.len() as u64 != b.bytes {
                        return Err(RunError::Weight {
                            name: name.clone(),
                            message: format!("{} bytes for a buffer of {}", bytes.len(), b.bytes),
                        });
                    }
                    device.write(a, &bytes)?;
                }
                BufferKind::Constant {
                    init: ConstantInit::RopeInvFreq { theta, head_dim },
                } => {
                    device.write(a, &encode(b.dtype, &rope_inv_freq(*theta, *head_dim)))?;
                }
                BufferKind::Constant {
                    init:
                        ConstantInit::RopeInvFreqLlama3 {
                            theta,
                            head_dim,
                            factor,
                            low_freq_factor,
                            high_freq_factor,
                            original_max_position_embeddings,
                        },
                } => {
                    let scaling = fusec_ir::rope::Llama3Scaling {
                        factor: *factor,
                        low_freq_factor: *low_freq_factor,
                        high_freq_factor: *high_freq_factor,
                        original_max_position_embeddings: *original_max_position_embeddings,
                    };
                    let inv = fusec_ir::rope::llama3_inv_freq(*theta, *head_dim, &scaling);
                    device.write(a, &encode(b.dtype, &inv))?;
                }
                _ => {}
            }
            addr.push(a);
        }
        Ok(Runner {
            device,
            plan,
            addr,
            past: 0,
        })
    }

    pub fn plan(&self) -> &LaunchPlan {
        &self.plan
    }

    pub fn device(&mut self) -> &mut D {
        &mut self.device
    }

    /// Positions cached so far.
    pub fn past(&self) -> u64 {
        self.past
    }

    /// Sets the number of cached positions without running the steps that would fill
    /// them, so that a benchmark can time a step at a long context (the caches hold
    /// whatever they held).
    pub fn set_past(&mut self, past: u64) -> Result<(), RunError> {
        if past >= self.plan.shape.max_seq_len {
            return Err(RunError::Input {
                name: step::POSITION_IDS.into(),
                message: format!(
                    "the caches hold at most {} positions",
                    self.plan.shape.max_seq_len
                ),
            });
        }
        self.past = past;
        Ok(())
    }

    /// Empties the KV caches and zeroes every kernel workspace (the split-KV partials
    /// and tickets, the post-norm tickets): the kernels leave a workspace as they found
    /// it only when every launch of a step ran to its end, so a step cut short (an error,
    /// an interrupted run) could leave a ticket counted and the next combine wrong.
    pub fn reset(&mut self) -> Result<(), RunError> {
        let mut clear: Vec<usize> = Vec::new();
        for s in &self.plan.states {
            clear.extend([s.input.buffer, s.output.buffer]);
        }
        clear.extend(
            (0..self.plan.buffers.len())
                .filter(|&b| self.plan.buffers[b].kind == BufferKind::Workspace),
        );
        clear.sort_unstable();
        clear.dedup();
        for b in clear {
            let bytes = self.plan.buffers[b].bytes as usize;
            self.device.write(self.addr[b], &vec![0u8; bytes])?;
        }
        self.past = 0;
        Ok(())
    }

    /// The plan's data input `name` (cloned: the caller writes buffers meanwhile).
    fn input(&self, name: &str) -> Result<Binding, RunError> {
        self.plan
            .inputs
            .iter()
            .find(|b| b.name == name)
            .cloned()
            .ok_or_else(|| RunError::Input {
                name: name.into(),
                message: "not an input of the plan".into(),
            })
    }

    /// Writes a data input's values (row-major over its shape at this step).
    fn upload(&mut self, name: &str, values: &[f32]) -> Result<(), RunError> {
        let binding = self.input(name)?;
        let v = &binding.view;
        let offs = offsets(v, self.past)?;
        if offs.len() != values.len() {
            return Err(RunError::Input {
                name: name.into(),
                message: format!("{} values for {} elements", values.len(), offs.len()),
            });
        }
        let buf = &self.plan.buffers[v.buffer];
        let size = buf.dtype.size_bytes();
        let mut bytes = vec![0u8; buf.bytes as usize];
        for (o, x) in offs.iter().zip(values) {
            let e = encode(buf.dtype, std::slice::from_ref(x));
            let at = (o * size) as usize;
            bytes[at..at + e.len()].copy_from_slice(&e);
        }
        self.device.write(self.addr[v.buffer], &bytes)
    }

    /// Reads a data output's values, row-major.
    fn download(&mut self, name: &str) -> Result<Vec<f32>, RunError> {
        let binding = self
            .plan
            .outputs
            .iter()
            .find(|b| b.name == name)
            .cloned()
            .ok_or_else(|| RunError::Plan(format!("the plan has no output `{name}`")))?;
        let v = &binding.view;
        let buf = &self.plan.buffers[v.buffer];
        let bytes = self.device.read(self.addr[v.buffer], buf.bytes as usize)?;
        let all = decode(buf.dtype, &bytes);
        offsets(v, self.past)?
            .into_iter()
            .map(|o| {
                all.get(o as usize)
                    .copied()
                    .ok_or_else(|| RunError::Plan(format!("output `{name}` overruns its buffer")))
            })
            .collect()
    }

    /// Launches every kernel of the plan once, with `S` the positions cached so far,
    /// without touching inputs or outputs (for timing).
    pub fn launch_all(&mut self) -> Result<(), RunError> {
        let past = i32::try_from(self.past)
            .map_err(|_| RunError::Plan("position overflows i32".into()))?;
        let mut args = Vec::new();
        for l in &self.plan.launches {
            args.clear();
            for a in &l.args {
                if let Arg::Buffer { buffer, .. } = a {
                    args.push(self.addr[*buffer]);
                }
            }
            self.device
                .launch(&l.kernel, l.grid, l.block, l.shared_bytes, &args, past)?;
        }
        Ok(())
    }

    /// After a step, the KV caches that were copied rather than appended in place
    /// hold their next value in the other buffer: swap the two.
    fn commit(&mut self) {
        self.commit_positions(1);
    }

    /// [`Runner::commit`] after a step that cached `n` positions.
    fn commit_positions(&mut self, n: u64) {
        for s in &self.plan.states {
            if s.input.buffer != s.output.buffer {
                self.addr.swap(s.input.buffer, s.output.buffer);
            }
        }
        self.past += n;
    }

    /// Checks `tokens` for a step of `t` per sequence: `batch * t` of them, room in the
    /// caches for `t` more positions, every id in the vocabulary.
    fn check_tokens(&self, tokens: &[i32], t: u64) -> Result<(), RunError> {
        let batch = self.plan.shape.batch as usize;
        if tokens.len() != batch * t as usize {
            let per = if t == 1 {
                String::new()
            } else {
                format!(" with {t} per sequence")
            };
            return Err(RunError::Input {
                name: step::INPUT_IDS.into(),
                message: format!("{} tokens for a batch of {batch}{per}", tokens.len()),
            });
        }
        if self.past + t > self.plan.shape.max_seq_len {
            return Err(RunError::Input {
                name: step::POSITION_IDS.into(),
                message: format!(
                    "the caches hold at most {} positions",
                    self.plan.shape.max_seq_len
                ),
            });
        }
        if let Some(vocab) = self.vocab() {
            if let Some(x) = tokens.iter().find(|&&x| x < 0 || x as u64 >= vocab) {
                return Err(RunError::Input {
                    name: step::INPUT_IDS.into(),
                    message: format!("token id {x} is out of range for a vocabulary of {vocab}"),
                });
            }
        }
        Ok(())
    }

    /// One step of a prefill plan (a graph of `fusec_model::blocks::StepDims::prefill`):
    /// `T` tokens per sequence, sequence by sequence, at the next `T` positions. It
    /// uploads the ids, the positions `S .. S + T` and the causal mask `[B, 1, T, S + T]`
    /// (row `t` sees positions `..= S + t`, as `fusec_exec`'s `Session::prefill` builds
    /// it), launches every kernel, and reads back the logits (per sequence: the last
    /// position's, or every position's one after another) and the greedy tokens.
    pub fn step_prefill(&mut self, tokens: &[i32]) -> Result<Step, RunError> {
        let batch = self.plan.shape.batch as usize;
        let ids = self.input(step::INPUT_IDS)?;
        let t = match ids.view.dims_at_capacity.as_slice() {
            [_, t] => *t,
            _ => {
                return Err(RunError::Plan(format!(
                    "`{}` is not [B,T]",
                    step::INPUT_IDS
                )))
            }
        };
        self.check_tokens(tokens, t)?;
        let past = self.past;
        let names_in: Vec<String> = self.plan.inputs.iter().map(|b| b.name.clone()).collect();
        for name in names_in {
            match name.as_str() {
                step::INPUT_IDS => {
                    let v: Vec<f32> = tokens.iter().map(|&x| x as f32).collect();
                    self.upload(&name, &v)?;
                }
                step::POSITION_IDS => {
                    let row: Vec<f32> = (0..t).map(|i| (past + i) as f32).collect();
                    self.upload(&name, &row.repeat(batch))?;
                }
                other => match step::mask_window(other) {
                    Some(None) => {
                        let len = past + t;
                        let mut row = Vec::with_capacity((t * len) as usize);
                        for i in 0..t {
                            row.extend((0..len).map(|j| {
                                if j <= past + i {
                                    0.0
                                } else {
                                    f32::NEG_INFINITY
                                }
                            }));
                        }
                        self.upload(&name, &row.repeat(batch))?;
                    }
                    Some(Some(w)) => {
                        return Err(RunError::Plan(format!(
                        "a prefill with a sliding window of {w} positions is not supported on CUDA"
                    )))
                    }
                    None => {
                        return Err(RunError::Plan(format!("cannot feed data input `{other}`")))
                    }
                },
            }
        }
        self.launch_all()?;
        self.device.sync()?;
        let logits = self.download(step::LOGITS)?;
        let next = self.download(step::NEXT_TOKEN)?;
        self.commit_positions(t);
        let per = logits.len() / batch.max(1);
        Ok(Step {
            logits: logits.chunks(per.max(1)).map(<[f32]>::to_vec).collect(),
            next: next.into_iter().map(|x| x as i32).collect(),
        })
    }

    /// One decode step: one token per sequence at the next position.
    pub fn step(&mut self, tokens: &[i32]) -> Result<Step, RunError> {
        let batch = self.plan.shape.batch as usize;
        self.check_tokens(tokens, 1)?;
        let names_in: Vec<String> = self.plan.inputs.iter().map(|b| b.name.clone()).collect();
        for name in names_in {
            match name.as_str() {
                step::INPUT_IDS => {
                    let v: Vec<f32> = tokens.iter().map(|&t| t as f32).collect();
                    self.upload(&name, &v)?;
                }
                step::POSITION_IDS => self.upload(&name, &vec![self.past as f32; batch])?,
                // Every cached position is visible: the additive mask is zero. A
                // sliding window's ring holds only positions inside the window, so its
                // mask, one entry per slot, is zero too.
                other => {
                    let Some(window) = step::mask_window(other) else {
                        return Err(RunError::Plan(format!("cannot feed data input `{other}`")));
                    };
                    let len = self.past + 1;
                    let len = window.map_or(len, |w| len.min(w));
                    let n = batch * len as usize;
                    self.upload(&name, &vec![0.0; n])?;
                }
            }
        }
        self.launch_all()?;
        self.device.sync()?;
        let logits = self.download(step::LOGITS)?;
        let next = self.download(step::NEXT_TOKEN)?;
        self.commit();
        let vocab = logits.len() / batch.max(1);
        Ok(Step {
            logits: logits.chunks(vocab.max(1)).map(<[f32]>::to_vec).collect(),
            next: next.into_iter().map(|t| t as i32).collect(),
        })
    }

    /// One step of a paged plan (see the module documentation): uploads `inputs`,
    /// launches every kernel, and reads the logits and greedy tokens back. The pools
    /// are states updated in place; [`Runner::past`] is not used and stays as it is.
    /// A position or block id the kernels cannot use reads and writes nothing there
    /// (the CPU executor refuses such a step): check them on the host first.
    pub fn step_paged(&mut self, inputs: &PagedInputs<'_>) -> Result<Step, RunError> {
        let batch = self.plan.shape.batch as usize;
        let paged = self
            .plan
            .shape
            .paged
            .ok_or_else(|| RunError::Plan("not a paged step's plan".into()))?;
        for (name, n) in [
            (step::INPUT_IDS, inputs.tokens.len()),
            (step::POSITION_IDS, inputs.positions.len()),
        ] {
            if n != batch {
                return Err(RunError::Input {
                    name: name.into(),
                    message: format!("{n} values for a batch of {batch}"),
                });
            }
        }
        if let Some(vocab) = self.vocab() {
            if let Some(t) = inputs.tokens.iter().find(|&&t| t < 0 || t as u64 >= vocab) {
                return Err(RunError::Input {
                    name: step::INPUT_IDS.into(),
                    message: format!("token id {t} is out of range for a vocabulary of {vocab}"),
                });
            }
        }
        let width = paged.max_blocks as usize;
        for (name, values) in inputs.tables {
            if !self.plan.inputs.iter().any(|b| b.name == *name) {
                return Err(RunError::Input {
                    name: (*name).into(),
                    message: "not an input of the plan".into(),
                });
            }
            if values.len() != batch * width {
                return Err(RunError::Input {
                    name: (*name).into(),
                    message: format!("{} entries for {batch} rows of {width}", values.len()),
                });
            }
        }
        let names_in: Vec<String> = self.plan.inputs.iter().map(|b| b.name.clone()).collect();
        for name in names_in {
            let values: &[i32] = match name.as_str() {
                step::INPUT_IDS => inputs.tokens,
                step::POSITION_IDS => inputs.positions,
                other => inputs
                    .tables
                    .iter()
                    .find(|(n, _)| *n == other)
                    .map(|(_, v)| *v)
                    .ok_or_else(|| RunError::Input {
                        name: other.into(),
                        message: "no values given for this input of the plan".into(),
                    })?,
            };
            self.upload_i32(&name, values)?;
        }
        self.launch_all()?;
        self.device.sync()?;
        let logits = self.download(step::LOGITS)?;
        let next = self.download(step::NEXT_TOKEN)?;
        let vocab = logits.len() / batch.max(1);
        Ok(Step {
            logits: logits.chunks(vocab.max(1)).map(<[f32]>::to_vec).collect(),
            next: next.into_iter().map(|t| t as i32).collect(),
        })
    }

    /// Writes an i32 data input's values (row-major over its shape), exactly.
    fn upload_i32(&mut self, name: &str, values: &[i32]) -> Result<(), RunError> {
        let binding = self.input(name)?;
        let v = &binding.view;
        let buf = &self.plan.buffers[v.buffer];
        if buf.dtype != DType::I32 {
            return Err(RunError::Input {
                name: name.into(),
                message: format!("a paged step's inputs are i32, this one is {}", buf.dtype),
            });
        }
        let offs = offsets(v, self.past)?;
        if offs.len() != values.len() {
            return Err(RunError::Input {
                name: name.into(),
                message: format!("{} values for {} elements", values.len(), offs.len()),
            });
        }
        let mut bytes = vec![0u8; buf.bytes as usize];
        for (o, x) in offs.iter().zip(values) {
            let at = (o * 4) as usize;
            bytes
                .get_mut(at..at + 4)
                .ok_or_else(|| RunError::Plan(format!("input `{name}` overruns its buffer")))?
                .copy_from_slice(&x.to_le_bytes());
        }
        self.device.write(self.addr[v.buffer], &bytes)
    }

    /// The vocabulary: the embedding table's rows.
    fn vocab(&self) -> Option<u64> {
        self.plan.buffers.iter().find_map(|b| match &b.kind {
            BufferKind::Weight { name } if name == step::EMBED => b.dims.first().copied(),
            _ => None,
        })
    }
}

/// A [`Weights`] set as the runner's weight source: values converted to the dtype the
/// plan allocates (an FP8 weight's values are exact FP8 values already).
#[derive(Debug)]
pub struct CheckpointWeights<'a>(pub &'a Weights);

impl WeightSource for CheckpointWeights<'_> {
    fn bytes(&self, name: &str, dtype: DType, dims: &[u64]) -> Result<Vec<u8>, RunError> {
        let t = self.0.get(name).ok_or_else(|| RunError::Weight {
            name: name.into(),
            message: "not in the weights".into(),
        })?;
        let shape: Vec<u64> = t.shape().iter().map(|&d| d as u64).collect();
        if shape != dims {
            return Err(RunError::Weight {
                name: name.into(),
                message: format!("shape {shape:?}, the plan wants {dims:?}"),
            });
        }
        Ok(encode(dtype, &t.to_vec_f32()))
    }
}
