//! The interpreter: runs a verified graph node by node and measures what it does.
//!
//! - `plan.rs`: [`Executor::new`], the plan (order, operand slots, last uses, bound
//!   leaves, the caches moved into their kernels);
//! - `packing.rs`: GEMV weights in compact storage, packed on huge pages;
//! - `run.rs`: a step ([`Executor::run_into`] and its wrappers), the slot table and
//!   the per-node bookkeeping;
//! - `dispatch.rs`: the one exhaustive match over `Op`, from operands to a kernel;
//! - `traffic.rs`: the bytes a launch reads and writes;
//! - `value.rs`: runtime values ([`Value`]), a step's outputs ([`RunOutput`]) and
//!   where its inputs come from ([`StepInputs`]).
//!
//! [`Executor::new`] plans the graph once: a topological order, operand slots, the
//! point after which each value is dead (so intermediates and the previous KV cache are
//! freed as soon as possible), and the leaves bound at load time (weights, RoPE
//! frequencies). [`Executor::run`] then evaluates one step under given [`Bindings`](fusec_ir::shape::Bindings).
//!
//! The measurements come from the runtime tensors, not from `fusec_ir::cost`: a node
//! counts as a launch when its kernel runs; it writes its result's bytes, and reads each
//! operand's bytes through its view (the smaller of the view's and its buffer's size;
//! nothing for a scalar kernel argument; the gathered rows for an embedding table; the
//! stored FP8 values and the scales of a quantized weight). A KV append in place
//! (`kv.append`, `fused.decode_attention`) reads none of the cached entries it appends
//! to and writes only the new ones; if it had to copy a cache to make room, the copy
//! is counted too.
//!
//! **Ownership of the KV cache.** An append may write into a cache's buffer only if no
//! other tensor shares it. So the executor takes its inputs by value, and when a node
//! that appends in place is the last user of a cache, the cache is moved out of its
//! slot and handed to the kernel, which finds the buffer unshared. Input values are
//! kept until the end of the step (the append does not change what they show), so that
//! [`Executor::run_restoring`] can hand them back to the caller when a step fails.
//!
//! **Allocation.** A steady-state step allocates nothing on the heap.
//! [`Executor::run_into`] writes into a [`RunOutput`] that the caller keeps from step
//! to step, whose output list and per-node statistics keep their capacity; output
//! names are shared `Arc<str>`s; the inputs are taken out of the caller's container
//! ([`StepInputs`]) without touching its keys. The slot table and the per-node operand
//! lists live in the executor; tensor headers are inline ([`crate::tensor::Dims`]);
//! kernel buffers, their `Arc`s and the lists of multi-result kernels come from the
//! per-thread pool (`crate::pool`), and every value a step drops goes back to it.
//! Strings are only built on the error path. The test `tests/step_alloc.rs` counts
//! every allocation of steady-state steps.

mod check;
mod dispatch;
mod packing;
mod plan;
mod run;
mod traffic;
mod value;

use std::collections::HashMap;
use std::sync::Arc;

use fusec_ir::{Graph, NodeId, Op, OperandRole, OutputKind, Type};

use crate::error::Error;
use crate::kernels::KernelError;
use crate::tensor::Tensor;

pub(crate) use plan::dims;
pub(crate) use value::recycle;
pub use value::{RunOutput, StepInputs, Value};

/// The operand positions of an op that it appends to in place.
fn in_place_operands(op: &Op) -> impl Iterator<Item = usize> + '_ {
    op.in_place().map(|(operand, _)| operand)
}

/// Whether operand `i` of `op` is read only as a GEMV weight (or as the stored values
/// of a quantized one), so that its weight may be bound in compact storage.
fn is_gemv_weight_operand(op: &Op, i: usize) -> bool {
    op.operand_role(i).is_some_and(OperandRole::is_gemv_weight)
}

/// One node of the plan.
#[derive(Debug)]
struct Planned {
    id: NodeId,
    /// The position in the canonical order: the value's `%N` in the text form.
    number: usize,
    op: Op,
    layer: Option<u32>,
    ty: Type,
    /// Slots (plan positions) of the operands, in order.
    operands: Vec<usize>,
    /// Slots whose last use is this node: freed once it has run.
    free: Vec<usize>,
    /// Operand positions appended to in place whose last use is this node: their
    /// values are moved into the kernel (see the module documentation).
    owned: Vec<usize>,
    /// Whether this is an `input` or `state` leaf, whose value lives until the end of
    /// the step.
    is_input: bool,
    /// For an `input` or `state` leaf, its position among the graph's inputs (the
    /// order of `Graph::inputs`), by which [`StepInputs`] finds it.
    input: Option<usize>,
    /// The value of a leaf bound when the executor is built (weights, constants).
    bound: Option<Value>,
}

/// Runs one graph on the CPU, step after step. See the module documentation.
#[derive(Debug)]
pub struct Executor {
    graph: Graph,
    plan: Vec<Planned>,
    outputs: Vec<(Arc<str>, OutputKind, usize)>,
    /// The graph's inputs in the order of `Graph::inputs`, and their positions by name.
    input_names: Vec<Arc<str>>,
    input_index: HashMap<String, usize>,
    /// Reused across steps so a step allocates no slot table.
    slots: Vec<Option<Value>>,
    /// The per-node operand lists, kept empty between nodes and steps so that a step
    /// allocates none (see [`reuse_refs`]).
    spare_args: Vec<Option<&'static Value>>,
    spare_owned: Vec<Option<Tensor>>,
}

fn node_error(node: &Planned, source: KernelError) -> Error {
    Error::Node {
        node: node.number,
        op: node.op.to_string(),
        source,
    }
}

impl Executor {
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The graph's inputs, in the order of `Graph::inputs`: the positions by which a
    /// `Vec<Option<Tensor>>` gives them to [`Executor::run_into`].
    pub fn input_names(&self) -> &[Arc<str>] {
        &self.input_names
    }

    /// The position of the input called `name` among the graph's inputs.
    pub fn input_index(&self, name: &str) -> Option<usize> {
        self.input_index.get(name).copied()
    }
}
