//! The executor's state: the plan of nodes and the slots, inputs and operand lists it
//! keeps from step to step (built in `plan.rs`, run in `run.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use fusec_ir::{Graph, NodeId, Op, OperandRole, OutputKind, Type};

use super::value::Value;
use crate::error::Error;
use crate::kernels::KernelError;
use crate::tensor::Tensor;

/// The operand positions of an op that it appends to in place.
pub(super) fn in_place_operands(op: &Op) -> impl Iterator<Item = usize> + '_ {
    op.in_place().map(|(operand, _)| operand)
}

/// Whether operand `i` of `op` is read only as a GEMV weight (or as the stored values
/// of a quantized one), so that its weight may be bound in compact storage.
pub(super) fn is_gemv_weight_operand(op: &Op, i: usize) -> bool {
    op.operand_role(i).is_some_and(OperandRole::is_gemv_weight)
}

/// One node of the plan.
#[derive(Clone, Debug)]
pub(super) struct Planned {
    pub(super) id: NodeId,
    /// The position in the canonical order: the value's `%N` in the text form.
    pub(super) number: usize,
    pub(super) op: Op,
    pub(super) layer: Option<u32>,
    pub(super) ty: Type,
    /// Slots (plan positions) of the operands, in order.
    pub(super) operands: Vec<usize>,
    /// Slots whose last use is this node: freed once it has run.
    pub(super) free: Vec<usize>,
    /// Operand positions appended to in place whose last use is this node: their
    /// values are moved into the kernel (see the module documentation).
    pub(super) owned: Vec<usize>,
    /// Whether this is an `input` or `state` leaf, whose value lives until the end of
    /// the step.
    pub(super) is_input: bool,
    /// For an `input` or `state` leaf, its position among the graph's inputs (the
    /// order of `Graph::inputs`), by which [`StepInputs`] finds it.
    pub(super) input: Option<usize>,
    /// The value of a leaf bound when the executor is built (weights, constants).
    pub(super) bound: Option<Value>,
}

/// Runs one graph on the CPU, step after step. See the module documentation.
#[derive(Debug)]
pub struct Executor {
    pub(super) graph: Graph,
    pub(super) plan: Vec<Planned>,
    pub(super) outputs: Vec<(Arc<str>, OutputKind, usize)>,
    /// The graph's inputs in the order of `Graph::inputs`, and their positions by name.
    pub(super) input_names: Vec<Arc<str>>,
    pub(super) input_index: HashMap<String, usize>,
    /// Reused across steps so a step allocates no slot table.
    pub(super) slots: Vec<Option<Value>>,
    /// The per-node operand lists, kept empty between nodes and steps so that a step
    /// allocates none (see [`reuse_refs`]).
    pub(super) spare_args: Vec<Option<&'static Value>>,
    pub(super) spare_owned: Vec<Option<Tensor>>,
    /// Whether every result is checked for infinities and NaNs (a diagnosis mode: it
    /// reads every value once more).
    pub(super) check_finite: bool,
}

pub(super) fn node_error(node: &Planned, source: KernelError) -> Error {
    Error::Node {
        node: node.number,
        op: node.op.to_string(),
        kernel: source,
    }
}

impl Executor {
    /// Checks every result of every step for infinities and NaNs; the first one found
    /// fails the step with [`KernelError::NonFinite`], naming its node and op.
    pub fn set_check_finite(&mut self, on: bool) {
        self.check_finite = on;
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Another executor of the same plan, for another session: it shares every bound
    /// leaf (the packed weights, the RoPE tables: their buffers are reference-counted,
    /// and nothing writes them) and has its own slots and operand lists, so that many
    /// sessions decode over one copy of the weights. Only the plan's small per-node
    /// records and the graph are copied.
    pub fn fork(&self) -> Executor {
        let widest = self
            .plan
            .iter()
            .map(|n| n.operands.len())
            .max()
            .unwrap_or(0);
        Executor {
            graph: self.graph.clone(),
            plan: self.plan.clone(),
            outputs: self.outputs.clone(),
            input_names: self.input_names.clone(),
            input_index: self.input_index.clone(),
            slots: vec![None; self.plan.len()],
            spare_args: Vec::with_capacity(widest),
            spare_owned: Vec::with_capacity(widest),
            check_finite: self.check_finite,
        }
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
