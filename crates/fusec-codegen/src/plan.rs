//! The launch plan: everything a runner needs besides the kernel source. Buffers with
//! their sizes, and the kernels to launch in order with their grids and arguments.
//!
//! Invariant: a plan is a pure function of the graph, the decode shape and the
//! options, and serialises deterministically (vectors in a fixed order, no maps).

use fusec_ir::DType;
use serde::{Deserialize, Serialize};

use crate::options::DecodeShape;

/// Index of a buffer in [`LaunchPlan::buffers`].
pub type BufferId = usize;

/// One step's kernels and buffers. See the module documentation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LaunchPlan {
    /// The graph's name.
    pub graph: String,
    /// The shape the kernels are specialised for.
    pub shape: DecodeShape,
    /// Bytes of the activation arena that [`BufferKind::Intermediate`] buffers share.
    pub arena_bytes: u64,
    pub buffers: Vec<Buffer>,
    /// Kernel launches, in execution order.
    pub launches: Vec<Launch>,
    /// Data inputs the runner uploads before each step.
    pub inputs: Vec<Binding>,
    /// Data outputs the runner reads after each step.
    pub outputs: Vec<Binding>,
    /// KV caches: read from `input`, their next value is in `output`. Where the two
    /// are different buffers (the eager graph copies the cache with `cat`) the runner
    /// swaps the two buffers after the step; where they are one buffer the step
    /// appended in place.
    pub states: Vec<StateBinding>,
}

/// A device allocation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Buffer {
    pub name: String,
    pub kind: BufferKind,
    pub dtype: DType,
    /// The allocated shape: a dimension that depends on `S` is allocated for its
    /// capacity (see [`DecodeShape::capacity`]).
    pub dims: Vec<u64>,
    /// `dims` as the IR writes them (`S+1`), for readers.
    pub ir_shape: String,
    /// Allocated bytes.
    pub bytes: u64,
    /// Where the buffer lies in the arena (intermediates only).
    pub arena_offset: Option<u64>,
}

/// What a buffer holds and who fills it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BufferKind {
    /// A model weight, uploaded once (in `dtype`, converted from the checkpoint).
    Weight { name: String },
    /// A load-time constant the runner computes and uploads once.
    Constant { init: ConstantInit },
    /// A data input, uploaded before each step.
    Input { name: String },
    /// A KV cache, zeroed once, carried across steps.
    State { name: String },
    /// The next value of a KV cache, when the graph does not append in place.
    StateNext { name: String },
    /// A data output, read back after each step.
    Output { name: String },
    /// A value produced and consumed within one step, placed in the arena.
    Intermediate,
    /// Scratch memory of one kernel family (split-KV partial results and counters):
    /// zeroed once; the kernels leave it as they found it.
    Workspace,
}

/// How the runner computes a [`BufferKind::Constant`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ConstantInit {
    /// `theta^(-2j/head_dim)` for `j < head_dim/2`, in f32, as the IR's
    /// `rope.inv_freq` and Hugging Face compute it.
    RopeInvFreq { theta: f64, head_dim: u64 },
    /// Llama 3's scaled inverse frequencies, as the IR's `rope.inv_freq_llama3` and
    /// transformers' `_compute_llama3_parameters` compute them.
    RopeInvFreqLlama3 {
        theta: f64,
        head_dim: u64,
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: u64,
    },
}

/// A tensor seen through a buffer: element offset and strides (0 broadcasts), with
/// its dimensions as the IR writes them (`S+1`) and at capacity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewInfo {
    pub buffer: BufferId,
    pub dtype: DType,
    /// The dimensions, symbolic where the IR's are.
    pub shape: Vec<String>,
    /// The dimensions when the cache is full.
    pub dims_at_capacity: Vec<u64>,
    /// Element offset into the buffer.
    pub offset: u64,
    /// Element strides.
    pub strides: Vec<u64>,
}

/// A named graph input or output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub name: String,
    pub view: ViewInfo,
}

/// A KV cache's buffers before and after the step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateBinding {
    pub name: String,
    pub input: ViewInfo,
    pub output: ViewInfo,
}

/// How a kernel uses a buffer argument.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    Read,
    Write,
    ReadWrite,
}

/// One kernel argument, in the order of the kernel's parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "arg", rename_all = "snake_case")]
pub enum Arg {
    /// A device pointer to the buffer's first element.
    Buffer { buffer: BufferId, access: Access },
    /// `S`, the positions cached before the step, as a 32-bit `int`.
    PastLen,
}

/// One kernel launch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    /// The kernel's name in the source.
    pub kernel: String,
    /// The IR value it computes, `%N` in the canonical text form.
    pub value: usize,
    /// The op token, e.g. `fused.decode_attention`.
    pub op: String,
    pub layer: Option<u32>,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    /// Dynamic shared memory bytes.
    pub shared_bytes: u32,
    pub args: Vec<Arg>,
    /// The operand and result views the kernel has baked in, operands first.
    pub views: Vec<ViewInfo>,
    /// For the attention kernel of a paged KV cache: what it reads per attended
    /// position, so that its traffic can be counted from the step's real positions
    /// ([`LaunchPlan::paged_kv_bytes_read`]); the types give only the table's reach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paged: Option<PagedReads>,
}

/// What one paged attention launch reads: each row at position `p` reads the key and
/// value rows of its positions `start ..= p` (`start = p + 1 - W` for a sliding
/// window `W`, else 0), `kv_heads * head_dim` elements each.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagedReads {
    pub kv_heads: u64,
    pub head_dim: u64,
    /// Bytes per element of the pools.
    pub element_bytes: u64,
    /// Positions the block table reaches, `M * BS`: a row at or past it reads nothing.
    pub reach: u64,
    pub window: Option<u64>,
}

impl PagedReads {
    /// Positions a row at `position` attends (0 for a position the kernel skips).
    pub fn attended(&self, position: i32) -> u64 {
        match u64::try_from(position) {
            Ok(p) if p < self.reach => {
                let start = self.window.map_or(0, |w| (p + 1).saturating_sub(w.max(1)));
                p + 1 - start
            }
            _ => 0,
        }
    }

    /// Bytes of keys and values the launch reads for rows at `positions`.
    pub fn bytes_read(&self, positions: &[i32]) -> u64 {
        let row = 2 * self.kv_heads * self.head_dim * self.element_bytes;
        positions
            .iter()
            .map(|&p| self.attended(p).saturating_mul(row))
            .fold(0, u64::saturating_add)
    }
}

impl LaunchPlan {
    /// The plan as pretty-printed JSON.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self)
    }

    /// Bytes of the paged KV pools the step's attention launches read, for rows at
    /// `positions` (one per row of the batch): the positions actually attended, as the
    /// CPU executor's paged kernel counts them (`fusec_exec`'s `paged_attention`
    /// counts f32 elements, the buffers it holds; here the pools' own dtype).
    pub fn paged_kv_bytes_read(&self, positions: &[i32]) -> u64 {
        self.launches
            .iter()
            .filter_map(|l| l.paged.as_ref())
            .map(|p| p.bytes_read(positions))
            .fold(0, u64::saturating_add)
    }

    /// Total bytes the runner allocates: every buffer outside the arena, plus the arena.
    pub fn device_bytes(&self) -> u64 {
        self.arena_bytes
            + self
                .buffers
                .iter()
                .filter(|b| b.arena_offset.is_none())
                .map(|b| b.bytes)
                .sum::<u64>()
    }
}
