//! The interpreter: runs a verified graph node by node and measures what it does.
//!
//! [`Executor::new`] plans the graph once: a topological order, operand slots, the
//! point after which each value is dead (so intermediates and the previous KV cache are
//! freed as soon as possible), and the leaves bound at load time (weights, RoPE
//! frequencies). [`Executor::run`] then evaluates one step under given [`Bindings`].
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

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use fusec_ir::op::resolve_axis;
use fusec_ir::shape::{Bindings, Shape};
use fusec_ir::{verify, FusedOp, Graph, NodeId, Op, OperandRole, OutputKind, TensorType, Type};

use crate::error::Error;
use crate::kernels::attention::{self, Caches};
use crate::kernels::elementwise::Arg;
use crate::kernels::gemv::{self, GemvWeight, QuantWeight};
use crate::kernels::{constant, elementwise, fused, gather, matmul, movement, reduce, KernelError};
use crate::profile::{NodeStats, StepStats};
use crate::tensor::{Buffer, Dims, Tensor, TensorError};
use crate::weights::Weights;
use crate::{dtype, hugepages, pack, pool, team};

/// A runtime value: a tensor, a scalar kernel argument, the results of a
/// multi-result (fused) op, read with `get`, or a quantized GEMV weight (a `dequant`
/// node, which launches nothing: its consumer reads the FP8 values and the scales).
#[derive(Clone, Debug)]
pub enum Value {
    Tensor(Tensor),
    Scalar(f32),
    Tuple(Vec<Tensor>),
    Quant(QuantWeight),
}

impl Value {
    /// The tensor, if this is one.
    pub fn tensor(&self) -> Option<&Tensor> {
        match self {
            Value::Tensor(t) => Some(t),
            Value::Scalar(_) | Value::Tuple(_) | Value::Quant(_) => None,
        }
    }

    pub fn into_tensor(self) -> Option<Tensor> {
        match self {
            Value::Tensor(t) => Some(t),
            Value::Scalar(_) | Value::Tuple(_) | Value::Quant(_) => None,
        }
    }

    /// Drops the value, giving its buffers that no other value shares back to this
    /// thread's buffer pool, where the executor's next step finds them. A caller that
    /// takes outputs out of a [`RunOutput`] and drops them frees their buffers
    /// instead, and the next step has to allocate new ones.
    pub fn recycle(self) {
        recycle(self);
    }

    /// Bytes a kernel reads when it reads this value once.
    fn read_bytes(&self) -> u64 {
        match self {
            Value::Tensor(t) => t.read_bytes(),
            Value::Scalar(_) => 0,
            Value::Tuple(ts) => ts.iter().map(Tensor::read_bytes).sum(),
            Value::Quant(q) => q.read_bytes(),
        }
    }

    /// Bytes a kernel writes when it produces this value.
    fn bytes(&self) -> u64 {
        match self {
            Value::Tensor(t) => t.bytes(),
            Value::Scalar(_) => 4,
            Value::Tuple(ts) => ts.iter().map(Tensor::bytes).sum(),
            Value::Quant(q) => q.values.bytes() + q.scale.bytes(),
        }
    }
}

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

/// The graph's outputs after one step, with the step's measurements.
///
/// Kept from step to step and handed to [`Executor::run_into`], it keeps the capacity
/// of its lists, so that a steady-state step allocates none. A caller may drain
/// `outputs` to keep values, and give those it is done with back through
/// [`Value::recycle`]; whatever it leaves there goes back to the buffer pool at the
/// start of the next step.
#[derive(Debug, Default)]
pub struct RunOutput {
    /// Each output's name (shared with the executor, so that a step copies no string),
    /// kind and value, in the graph's order.
    pub outputs: Vec<(Arc<str>, OutputKind, Value)>,
    pub stats: StepStats,
}

impl RunOutput {
    pub fn new() -> RunOutput {
        RunOutput::default()
    }

    /// The output called `name`.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.outputs
            .iter()
            .find(|(n, _, _)| &**n == name)
            .map(|(_, _, v)| v)
    }

    /// Empties the output list and the statistics, keeping their capacity; the values
    /// left in the list go back to the buffer pool.
    fn clear(&mut self) {
        self.outputs.drain(..).for_each(|(_, _, v)| recycle(v));
        let mut nodes = std::mem::take(&mut self.stats.nodes);
        nodes.clear();
        self.stats = StepStats {
            nodes,
            ..StepStats::default()
        };
    }
}

/// Where a step's `input` and `state` leaves come from: the executor takes each one
/// out by its position among the graph's inputs (the order of `Graph::inputs`, see
/// [`Executor::input_index`]) or by name, and puts them back if the step fails.
///
/// A map by name (`HashMap<String, Tensor>`) is the simple form; a vector indexed by
/// position (`Vec<Option<Tensor>>`) is what a decode loop keeps from step to step.
/// Neither allocates when a tensor is taken: the map only drops the key.
pub trait StepInputs {
    /// Takes input `index`, called `name`, out; `None` when it was not given.
    fn take_input(&mut self, index: usize, name: &str) -> Option<Tensor>;

    /// Puts input `index`, called `name`, back after a failed step.
    fn restore_input(&mut self, index: usize, name: &str, tensor: Tensor);

    /// An entry that is not an input of `exec`'s graph, by name, if there is one.
    fn unknown_input(&self, exec: &Executor) -> Option<String>;
}

impl StepInputs for HashMap<String, Tensor> {
    fn take_input(&mut self, _: usize, name: &str) -> Option<Tensor> {
        self.remove(name)
    }

    fn restore_input(&mut self, _: usize, name: &str, tensor: Tensor) {
        self.insert(name.to_string(), tensor);
    }

    fn unknown_input(&self, exec: &Executor) -> Option<String> {
        self.keys().find(|n| exec.input_index(n).is_none()).cloned()
    }
}

impl StepInputs for Vec<Option<Tensor>> {
    fn take_input(&mut self, index: usize, _: &str) -> Option<Tensor> {
        self.get_mut(index).and_then(Option::take)
    }

    fn restore_input(&mut self, index: usize, _: &str, tensor: Tensor) {
        if self.len() <= index {
            self.resize_with(index + 1, || None);
        }
        self[index] = Some(tensor);
    }

    fn unknown_input(&self, exec: &Executor) -> Option<String> {
        let n = exec.input_names.len();
        self.iter()
            .enumerate()
            .skip(n)
            .find(|(_, t)| t.is_some())
            .map(|(i, _)| format!("#{i} (the graph has {n} inputs)"))
    }
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

/// The concrete dimensions of `shape` under `b`, evaluated one by one into a [`Dims`]
/// (a reshape or expand does this on every step, so it builds no vector).
pub(crate) fn dims(shape: &Shape, b: &Bindings) -> Result<Dims, Error> {
    let mut out = Dims::new();
    for d in shape.dims() {
        let v = d.eval(b).map_err(|e| Error::Unbound(e.0))?;
        let v = usize::try_from(v)
            .map_err(|_| Error::InvalidGraph(format!("dimension {v} does not fit in memory")))?;
        out.push(v)
            .map_err(|e| Error::InvalidGraph(format!("shape {shape}: {e}")))?;
    }
    Ok(out)
}

/// Whether `t` has the dtype and shape of `ty` under `b`.
fn matches_type(t: &Tensor, ty: &TensorType, b: &Bindings) -> Result<bool, Error> {
    Ok(t.dtype() == ty.dtype && shape_matches(t.shape(), &ty.shape, b)?)
}

/// Whether `actual` is `shape` under `b`, evaluated dimension by dimension: this runs
/// for every node of every step, so it builds no vector.
fn shape_matches(actual: &[usize], shape: &Shape, b: &Bindings) -> Result<bool, Error> {
    if actual.len() != shape.rank() {
        return Ok(false);
    }
    for (d, &n) in shape.dims().iter().zip(actual) {
        let v = d.eval(b).map_err(|e| Error::Unbound(e.0))?;
        if usize::try_from(v).ok() != Some(n) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `refs`, emptied and retyped for borrows of any lifetime, keeping its allocation:
/// the standard library collects a mapped `Vec` iterator into the same allocation
/// when the element layouts match, so the per-node operand list reuses one buffer
/// across nodes and steps (the step allocation test checks it).
fn reuse_refs<'b>(mut refs: Vec<Option<&Value>>) -> Vec<Option<&'b Value>> {
    refs.clear();
    refs.into_iter().map(|_| None).collect()
}

fn describe(t: &Tensor) -> String {
    format!("{}{:?}", t.dtype(), t.shape())
}

impl Executor {
    /// Plans `graph` (which must verify) and binds its weights from `weights`, checking
    /// every weight's presence, shape and dtype.
    pub fn new(graph: Graph, weights: &Weights) -> Result<Executor, Error> {
        verify(&graph).map_err(|e| Error::InvalidGraph(e.to_string()))?;
        let order = graph
            .topo_order()
            .map_err(|e| Error::InvalidGraph(e.to_string()))?;
        let slot: HashMap<NodeId, usize> =
            order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        let graph_inputs = graph.inputs();
        let input_of: HashMap<NodeId, usize> = graph_inputs
            .iter()
            .enumerate()
            .map(|(i, (id, _, _))| (*id, i))
            .collect();
        let mut last_use: Vec<usize> = (0..order.len()).collect();
        let mut plan = Vec::with_capacity(order.len());
        for (pos, &id) in order.iter().enumerate() {
            let node = graph.node(id);
            for t in node.ty.tensors() {
                if !dtype::is_supported(t.dtype) {
                    return Err(Error::InvalidGraph(format!(
                        "{} produces {t}: the CPU executor does not support {} yet",
                        node.op, t.dtype
                    )));
                }
            }
            let operands: Vec<usize> = graph.operands(id).iter().map(|o| slot[o]).collect();
            for &o in &operands {
                last_use[o] = last_use[o].max(pos);
            }
            let mut planned = Planned {
                id,
                number: pos,
                op: node.op.clone(),
                layer: node.layer,
                ty: node.ty.clone(),
                operands,
                free: Vec::new(),
                owned: Vec::new(),
                is_input: matches!(node.op, Op::Input { .. }),
                input: input_of.get(&id).copied(),
                bound: None,
            };
            // Leaves bound at load time: weights and load-time constants.
            if let Op::Weight { name } = &node.op {
                let ty = node.tensor_type().ok_or_else(|| {
                    Error::InvalidGraph(format!("weight `{name}` has a tuple type"))
                })?;
                planned.bound = Some(Value::Tensor(weights.bind(name, ty)?));
            } else if let Op::RopeInvFreq { theta, head_dim } = &node.op {
                let t = constant::rope_inv_freq(theta.0, *head_dim)
                    .map_err(|e| node_error(&planned, e))?;
                planned.bound = Some(Value::Tensor(t));
            }
            plan.push(planned);
        }
        let outputs: Vec<(Arc<str>, OutputKind, usize)> = graph
            .outputs()
            .iter()
            .map(|o| (Arc::from(o.name.as_str()), o.kind, slot[&o.value]))
            .collect();
        for (_, _, s) in &outputs {
            last_use[*s] = usize::MAX;
        }
        for node in &mut plan {
            let pos = node.number;
            node.owned = in_place_operands(&node.op)
                .filter(|&i| {
                    node.operands.get(i).is_some_and(|&s| {
                        last_use[s] == pos && node.operands.iter().filter(|&&o| o == s).count() == 1
                    })
                })
                .collect();
        }
        for (s, &pos) in last_use.iter().enumerate() {
            // Bound leaves keep their value in the slot from step to step (see
            // `run_plan`), so they are never freed.
            if pos != usize::MAX && !plan[s].is_input && plan[s].bound.is_none() {
                plan[pos].free.push(s);
            }
        }
        compact_gemv_weights(&mut plan, &last_use);
        let input_names: Vec<Arc<str>> =
            graph_inputs.iter().map(|(_, n, _)| Arc::from(*n)).collect();
        let input_index = graph_inputs
            .iter()
            .enumerate()
            .map(|(i, (_, n, _))| (n.to_string(), i))
            .collect();
        let slots = vec![None; plan.len()];
        let widest = plan.iter().map(|n| n.operands.len()).max().unwrap_or(0);
        Ok(Executor {
            graph,
            plan,
            outputs,
            input_names,
            input_index,
            slots,
            spare_args: Vec::with_capacity(widest),
            spare_owned: Vec::with_capacity(widest),
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Runs one step. `inputs` gives every `input` and `state` leaf by name, with the
    /// dtype and shape its type has under `bindings`. A KV cache given here is appended
    /// to in place when it has room and nothing else shares its buffer.
    pub fn run(
        &mut self,
        bindings: &Bindings,
        mut inputs: HashMap<String, Tensor>,
    ) -> Result<RunOutput, Error> {
        self.run_restoring(bindings, &mut inputs)
    }

    /// Runs one step like [`Executor::run`], taking the inputs out of `inputs`. If the
    /// step fails, every input is put back into `inputs` with the values it had (an
    /// in-place append writes only past the end of the cache it was given), so the
    /// caller can go on from where it was.
    pub fn run_restoring(
        &mut self,
        bindings: &Bindings,
        inputs: &mut HashMap<String, Tensor>,
    ) -> Result<RunOutput, Error> {
        let mut out = RunOutput::new();
        self.run_into(bindings, inputs, &mut out)?;
        Ok(out)
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

    /// Runs one step like [`Executor::run_restoring`], taking the inputs out of
    /// `inputs` (by name or by position, see [`StepInputs`]) and writing the outputs
    /// and measurements into `out`, whose earlier contents it replaces. With `out`
    /// kept from step to step, a steady-state step allocates nothing (see the module
    /// documentation). If the step fails, every input is put back into `inputs` and
    /// `out` is left empty.
    pub fn run_into(
        &mut self,
        bindings: &Bindings,
        inputs: &mut dyn StepInputs,
        out: &mut RunOutput,
    ) -> Result<(), Error> {
        out.clear();
        if let Some(extra) = inputs.unknown_input(self) {
            return Err(Error::BadInput {
                name: extra,
                message: "not an input of the graph".into(),
            });
        }
        let step_start = Instant::now();
        // Room for every launch and output; a no-op after the first step.
        out.stats.nodes.reserve(self.plan.len());
        out.outputs.reserve(self.outputs.len());
        let mut slots = std::mem::take(&mut self.slots);
        let mut spare = Spare {
            args: std::mem::take(&mut self.spare_args),
            owned: std::mem::take(&mut self.spare_owned),
        };
        // The step is one team region: its kernels' parallel loops go to workers that
        // spin for the whole step instead of sleeping between kernels (see `team`).
        let result = team::region(|| {
            self.run_plan(bindings, inputs, &mut slots, &mut spare, &mut out.stats)
        });
        self.spare_args = spare.args;
        self.spare_owned = spare.owned;
        match &result {
            Ok(()) => {
                // Each output's value moves out of its slot (a clone would keep its
                // buffer from going back to the pool), except when a later output
                // names the same value.
                for (i, (name, kind, s)) in self.outputs.iter().enumerate() {
                    let again = self.outputs[i + 1..].iter().any(|o| o.2 == *s);
                    let value = if again {
                        slots[*s].clone()
                    } else {
                        slots[*s].take()
                    };
                    if let Some(v) = value {
                        out.outputs.push((Arc::clone(name), *kind, v));
                    }
                }
                out.stats.time = step_start.elapsed();
            }
            Err(_) => {
                for node in self.plan.iter().filter(|n| n.is_input) {
                    if let (Op::Input { name, .. }, Some(index), Some(Value::Tensor(t))) =
                        (&node.op, node.input, slots[node.number].take())
                    {
                        inputs.restore_input(index, name, t);
                    }
                }
                out.clear();
            }
        }
        // Everything but the bound leaves' values goes back to the pool; those stay
        // for the next step.
        for (slot, node) in slots.iter_mut().zip(&self.plan) {
            if node.bound.is_none() {
                if let Some(v) = slot.take() {
                    recycle(v);
                }
            }
        }
        self.slots = slots;
        result
    }

    /// Runs every node of the plan, recording each launch in `stats` (emptied by the
    /// caller).
    fn run_plan(
        &self,
        b: &Bindings,
        inputs: &mut dyn StepInputs,
        slots: &mut [Option<Value>],
        spare: &mut Spare,
        stats: &mut StepStats,
    ) -> Result<(), Error> {
        for (pos, node) in self.plan.iter().enumerate() {
            // A bound leaf (a weight, RoPE frequencies) still holds the value an earlier
            // step gave it: there is nothing to do, not even a reference count to bump.
            if node.bound.is_some() && slots[pos].is_some() {
                continue;
            }
            // Caches appended to in place are moved out of their slots first, so the
            // kernel owns them (see the module documentation).
            let owned = &mut spare.owned;
            owned.clear();
            owned.resize(node.operands.len(), None);
            for &i in &node.owned {
                let s = node.operands[i];
                if let Some(Value::Tensor(_)) = slots[s] {
                    if let Some(Value::Tensor(t)) = slots[s].take() {
                        owned[i] = Some(t);
                    }
                }
            }
            let mut args = reuse_refs(std::mem::take(&mut spare.args));
            for (i, &o) in node.operands.iter().enumerate() {
                let v = slots[o].as_ref();
                if v.is_none() && owned[i].is_none() {
                    return Err(Error::InvalidGraph(format!(
                        "operand %{o} freed before its last use"
                    )));
                }
                args.push(v);
            }
            let mut operands = Operands { args: &args, owned };
            let start = Instant::now();
            let outcome = dispatch(node, &mut operands, inputs, b).map(|o| {
                let traffic = match (o.launched, o.traffic) {
                    (true, Some(t)) => t,
                    (true, None) => (read_bytes(&node.op, &args), o.value.bytes()),
                    (false, _) => (0, 0),
                };
                (o.value, o.launched, traffic)
            });
            let time = start.elapsed();
            spare.args = reuse_refs(args);
            // The moved caches go back to their slots (an input lives until the end of
            // the step) or are dropped, whatever the outcome.
            for (i, t) in spare.owned.iter_mut().enumerate() {
                if let Some(t) = t.take() {
                    let s = node.operands[i];
                    if self.plan[s].is_input {
                        slots[s] = Some(Value::Tensor(t));
                    } else {
                        pool::recycle(t);
                    }
                }
            }
            let (value, launched, (bytes_read, bytes_written)) = outcome?;
            check_result(node, &value, b)?;
            if launched {
                stats.launches += 1;
                stats.bytes_read += bytes_read;
                stats.bytes_written += bytes_written;
                stats.nodes.push(NodeStats {
                    node: node.id,
                    kind: node.op.name(),
                    layer: node.layer,
                    bytes_read,
                    bytes_written,
                    time,
                });
            }
            slots[pos] = Some(value);
            for &s in &node.free {
                if let Some(v) = slots[s].take() {
                    recycle(v);
                }
            }
        }
        Ok(())
    }
}

/// Converts, once, every `bf16`, `f16` or FP8 E4M3 weight that only GEMVs read to
/// compact storage (2 or 1 bytes per value instead of the `f32` every other kernel
/// reads), so that decode streams the bytes the IR's dtype says. A weight that any
/// other op reads, or that is an output, stays as it is; so does one with a value its
/// dtype cannot hold exactly, which a checked load never gives. Then the GEMV weights
/// are packed on huge pages ([`pack`]), and every other bound tensor is moved onto huge
/// pages where its allocation allows ([`hugepages`]).
fn compact_gemv_weights(plan: &mut [Planned], last_use: &[usize]) {
    let mut gemv_only = vec![true; plan.len()];
    let mut used = vec![false; plan.len()];
    for node in plan.iter() {
        for (i, &o) in node.operands.iter().enumerate() {
            used[o] = true;
            gemv_only[o] &= is_gemv_weight_operand(&node.op, i);
        }
    }
    for (s, node) in plan.iter_mut().enumerate() {
        if !used[s] || !gemv_only[s] || last_use[s] == usize::MAX {
            continue;
        }
        if let Some(Value::Tensor(t)) = &node.bound {
            if let Some(compact) = t.to_compact() {
                node.bound = Some(Value::Tensor(compact));
            }
        }
    }
    // The GEMV weights packed end to end on huge pages, in the order a step reads
    // them; every other bound tensor on huge pages where its allocation allows.
    let mut gemv_weights: Vec<&mut Tensor> = plan
        .iter_mut()
        .enumerate()
        .filter(|(s, _)| used[*s] && gemv_only[*s])
        .filter_map(|(_, node)| match &mut node.bound {
            Some(Value::Tensor(t)) => Some(t),
            _ => None,
        })
        .collect();
    pack::pack(&mut gemv_weights);
    for node in plan.iter() {
        // A packed weight's buffer was put on huge pages as it was written.
        if let Some(Value::Tensor(t)) = node.bound.as_ref().filter(|v| match v {
            Value::Tensor(t) => t.storage_len() == t.numel(),
            _ => false,
        }) {
            match t.buffer() {
                Buffer::F32(b) => hugepages::back_with_huge_pages(b),
                Buffer::I32(b) => hugepages::back_with_huge_pages(b),
                Buffer::U16(b) => hugepages::back_with_huge_pages(b),
                Buffer::U8(b) => hugepages::back_with_huge_pages(b),
            };
        }
    }
}

/// Returns the buffers of a dropped value to the pool (those no other value shares).
pub(crate) fn recycle(v: Value) {
    match v {
        Value::Tensor(t) => pool::recycle(t),
        Value::Tuple(ts) => pool::give_tensors(ts),
        Value::Scalar(_) | Value::Quant(_) => {}
    }
}

/// Bytes a launched op reads from its operands (all present: ops that move an operand
/// into the kernel measure their own traffic).
fn read_bytes(op: &Op, args: &[Option<&Value>]) -> u64 {
    let mut total = 0;
    for (i, arg) in args.iter().enumerate() {
        let Some(value) = arg else { continue };
        total += match (op.operand_role(i), value, args.get(1)) {
            // A gather reads one table row per id.
            (
                Some(OperandRole::EmbeddingTable),
                Value::Tensor(table),
                Some(Some(Value::Tensor(ids))),
            ) => {
                let row = table.shape().get(1).copied().unwrap_or(0) as u64;
                ids.numel() as u64 * row * table.dtype().size_bytes()
            }
            _ => value.read_bytes(),
        };
    }
    total
}

/// The per-node operand lists of [`Executor::run_plan`], lent by the executor for one
/// step so that their allocations outlive it.
struct Spare {
    args: Vec<Option<&'static Value>>,
    owned: Vec<Option<Tensor>>,
}

/// A node's operands: borrowed from their slots, or moved into the kernel.
struct Operands<'a, 'v> {
    args: &'a [Option<&'v Value>],
    owned: &'a mut [Option<Tensor>],
}

impl Operands<'_, '_> {
    fn len(&self) -> usize {
        self.args.len()
    }

    /// Operand `i` as a tensor of its own: the moved value, or a copy of the handle
    /// (which shares the buffer, so an append to it copies the cache first).
    fn take_tensor(&mut self, node: &Planned, i: usize) -> Result<Tensor, Error> {
        if let Some(t) = self.owned.get_mut(i).and_then(Option::take) {
            return Ok(t);
        }
        Ok(tensor_arg(node, operand(node, self.args, i)?, i)?.into_owned())
    }

    /// Gives a tensor taken with [`Operands::take_tensor`] back, so that the executor
    /// can keep an input's value to the end of the step.
    fn give_back(&mut self, i: usize, t: Tensor) {
        if let Some(slot) = self.owned.get_mut(i) {
            if self.args.get(i).is_some_and(Option::is_none) {
                *slot = Some(t);
            }
        }
    }

    /// Bytes read from the operands still in their slots.
    fn borrowed_read_bytes(&self) -> u64 {
        self.args.iter().flatten().map(|v| v.read_bytes()).sum()
    }
}

/// Operand `i` as borrowed from its slot: an error if it is missing or was moved into
/// the kernel.
fn operand<'v>(node: &Planned, args: &[Option<&'v Value>], i: usize) -> Result<&'v Value, Error> {
    match args.get(i) {
        Some(Some(v)) => Ok(v),
        Some(None) => Err(node_error(
            node,
            KernelError::Invalid(format!("operand {i} was moved into the kernel")),
        )),
        None => Err(node_error(
            node,
            KernelError::Invalid(format!("missing operand {i}")),
        )),
    }
}

/// What [`dispatch`] did: the value, whether a kernel ran, and the bytes it read and
/// wrote when the kernel measured them itself (an in-place append).
struct Outcome {
    value: Value,
    launched: bool,
    traffic: Option<(u64, u64)>,
}

/// Checks a node's runtime value against its IR type: a mismatch is an executor bug.
fn check_result(node: &Planned, value: &Value, b: &Bindings) -> Result<(), Error> {
    let ok = match (value, &node.ty) {
        (Value::Tensor(t), Type::Tensor(ty)) => matches_type(t, ty, b)?,
        (Value::Scalar(_), Type::Tensor(ty)) => {
            ty.dtype == fusec_ir::DType::F32 && ty.shape.rank() == 0
        }
        (Value::Tuple(ts), Type::Tuple(tys)) => {
            let mut ok = ts.len() == tys.len();
            for (t, ty) in ts.iter().zip(tys) {
                ok &= matches_type(t, ty, b)?;
            }
            ok
        }
        (Value::Quant(q), Type::Tensor(ty)) => {
            q.to == ty.dtype && shape_matches(q.shape(), &ty.shape, b)?
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        let got = match value {
            Value::Tensor(t) => describe(t),
            Value::Scalar(_) => "a scalar".into(),
            Value::Tuple(ts) => format!(
                "({})",
                ts.iter().map(describe).collect::<Vec<_>>().join(", ")
            ),
            Value::Quant(q) => format!("dequant of {}", describe(&q.values)),
        };
        Err(node_error(
            node,
            KernelError::Invalid(format!(
                "produced {got}, but the graph declares {}",
                node.ty
            )),
        ))
    }
}

/// An operand as a tensor: a scalar kernel argument becomes a rank-0 tensor.
fn tensor_arg<'a>(node: &Planned, v: &'a Value, i: usize) -> Result<Cow<'a, Tensor>, Error> {
    match v {
        Value::Tensor(t) => Ok(Cow::Borrowed(t)),
        Value::Scalar(v) => Ok(Cow::Owned(Tensor::scalar(*v))),
        Value::Tuple(_) => Err(node_error(
            node,
            KernelError::Invalid(format!("operand {i} is a tuple")),
        )),
        Value::Quant(_) => Err(node_error(
            node,
            KernelError::Invalid(format!(
                "operand {i} is a quantized weight, which only a GEMV can read"
            )),
        )),
    }
}

fn binary_arg<'a>(node: &Planned, v: &'a Value, i: usize) -> Result<Arg<'a>, Error> {
    match v {
        Value::Tensor(t) => Ok(Arg::Tensor(t)),
        Value::Scalar(v) => Ok(Arg::Scalar(*v)),
        _ => Err(node_error(
            node,
            KernelError::Invalid(format!("operand {i} is not a tensor")),
        )),
    }
}

/// An operand that must be one number: a scalar kernel argument or a one-element
/// tensor (a per-tensor scale weight).
fn scalar_arg(node: &Planned, v: &Value, i: usize) -> Result<f32, Error> {
    match v {
        Value::Scalar(x) => Ok(*x),
        // The one element read in place (the per-tensor scales of an FP8 graph are read
        // on every step). Every float value is exact in `f64`, so the cast is exact.
        Value::Tensor(t) if t.numel() == 1 && t.dtype().is_float() => Ok(t
            .get(&[0; crate::tensor::MAX_RANK][..t.rank()])
            .map_or(f32::NAN, |v| v as f32)),
        _ => Err(node_error(
            node,
            KernelError::Invalid(format!("operand {i} must be a scalar")),
        )),
    }
}

/// A GEMV weight operand: a plain tensor or a quantized weight.
fn gemv_arg<'a>(node: &Planned, v: &'a Value, i: usize) -> Result<GemvWeight<'a>, Error> {
    match v {
        Value::Tensor(t) => Ok(GemvWeight::Dense(t)),
        Value::Quant(q) => Ok(GemvWeight::Quant(q)),
        _ => Err(node_error(
            node,
            KernelError::Invalid(format!("operand {i} is not a GEMV weight")),
        )),
    }
}

/// Operand lists up to this long (`cat` operands, the weights of
/// `fused.rms_norm_linear`) are gathered on the stack; longer ones, which no graph of
/// the IR's builders has, go to the heap.
const MAX_INLINE_OPERANDS: usize = 8;

/// Evaluates one node: the single place that matches on every op. Returns the value,
/// whether a kernel ran, and the traffic of kernels that measure their own.
fn dispatch(
    node: &Planned,
    ops: &mut Operands<'_, '_>,
    inputs: &mut dyn StepInputs,
    b: &Bindings,
) -> Result<Outcome, Error> {
    let done = |value: Value, launched: bool| Outcome {
        value,
        launched,
        traffic: None,
    };
    let launch = |r: Result<Tensor, KernelError>| -> Result<Outcome, Error> {
        r.map(|t| done(Value::Tensor(t), true))
            .map_err(|e| node_error(node, e))
    };
    let view = |r: Result<Tensor, TensorError>| -> Result<Outcome, Error> {
        r.map(|t| done(Value::Tensor(t), false))
            .map_err(|e| node_error(node, e.into()))
    };
    let kernel = |e: KernelError| node_error(node, e);
    let bound = || {
        node.bound
            .clone()
            .map(|v| done(v, false))
            .ok_or_else(|| Error::InvalidGraph(format!("leaf {} was not bound at load", node.op)))
    };
    // Operands that only borrow; the caches an op appends to are taken from `ops`.
    let args = ops.args;
    let value = |i: usize| operand(node, args, i);
    let t = |i: usize| tensor_arg(node, value(i)?, i);
    let scalar = |i: usize| scalar_arg(node, value(i)?, i);
    let gemv_w = |i: usize| gemv_arg(node, value(i)?, i);
    let axis = |axis: i64, i: usize| -> Result<usize, Error> {
        let rank = value(i)?.tensor().map_or(0, Tensor::rank);
        resolve_axis(axis, rank).map_err(|m| node_error(node, KernelError::Invalid(m.to_string())))
    };
    match &node.op {
        Op::Input { name, .. } => {
            let ty = node
                .ty
                .tensor()
                .ok_or_else(|| Error::InvalidGraph(format!("input `{name}` has a tuple type")))?;
            let index = node.input.ok_or_else(|| {
                Error::InvalidGraph(format!("input `{name}` is not among the graph's inputs"))
            })?;
            let tensor = inputs
                .take_input(index, name)
                .ok_or_else(|| Error::BadInput {
                    name: name.clone(),
                    message: format!("missing (expected {ty})"),
                })?;
            if !matches_type(&tensor, ty, b)? {
                let message = format!(
                    "expected {}{:?}, got {}",
                    ty.dtype,
                    dims(&ty.shape, b)?,
                    describe(&tensor)
                );
                // The caller gets its input back (see `Executor::run_restoring`).
                inputs.restore_input(index, name, tensor);
                return Err(Error::BadInput {
                    name: name.clone(),
                    message,
                });
            }
            Ok(done(Value::Tensor(tensor), false))
        }
        Op::Weight { .. } | Op::RopeInvFreq { .. } => bound(),
        Op::Scalar { value } => Ok(done(Value::Scalar(value.0 as f32), false)),
        Op::Unary(u) => launch(elementwise::unary(*u, &*t(0)?)),
        Op::Binary(op) => launch(elementwise::binary(
            *op,
            binary_arg(node, value(0)?, 0)?,
            binary_arg(node, value(1)?, 1)?,
        )),
        Op::Cast { to } => launch(elementwise::cast(&*t(0)?, *to)),
        Op::Reduce {
            kind,
            axis: a,
            keepdim,
        } => launch(reduce::reduce(*kind, &*t(0)?, axis(*a, 0)?, *keepdim)),
        Op::Argmax { axis: a } => launch(reduce::argmax(&*t(0)?, axis(*a, 0)?)),
        Op::Softmax { axis: a } => launch(reduce::softmax(&*t(0)?, axis(*a, 0)?)),
        Op::MatMul => launch(matmul::matmul(&*t(0)?, &*t(1)?)),
        Op::Linear => match gemv_w(1)? {
            // A plain weight runs the eager kernel itself.
            GemvWeight::Dense(w) if w.f32_buffer().is_some() => launch(matmul::linear(&*t(0)?, w)),
            // A weight in compact storage runs the GEMV core, whose results are the
            // same (see `kernels::gemv`).
            w => launch(gemv::linear(&*t(0)?, w)),
        },
        Op::Embedding => launch(gather::embedding(&*t(0)?, &*t(1)?)),
        Op::Cat { axis: a } => {
            let tensor = |i: usize| match value(i)? {
                Value::Tensor(t) => Ok(t),
                _ => Err(node_error(
                    node,
                    KernelError::Invalid(format!("operand {i} is not a tensor")),
                )),
            };
            let axis = axis(*a, 0)?;
            let n = ops.len();
            if n <= MAX_INLINE_OPERANDS {
                // The operand list on the stack: a `cat` runs on every eager step.
                let mut parts = [tensor(0)?; MAX_INLINE_OPERANDS];
                for (i, p) in parts.iter_mut().enumerate().take(n).skip(1) {
                    *p = tensor(i)?;
                }
                launch(movement::cat(&parts[..n], axis))
            } else {
                let parts = (0..n).map(tensor).collect::<Result<Vec<_>, Error>>()?;
                launch(movement::cat(&parts, axis))
            }
        }
        Op::Copy => launch(movement::copy(&*t(0)?)),
        Op::Reshape { shape } => view(t(0)?.reshape(&dims(shape, b)?)),
        Op::Transpose { a, b: c } => view(t(0)?.transpose(*a, *c)),
        Op::Slice {
            axis: a,
            start,
            end,
        } => {
            let (start, end) = (usize::try_from(*start), usize::try_from(*end));
            match (start, end) {
                (Ok(s), Ok(e)) => view(t(0)?.slice(axis(*a, 0)?, s, e)),
                _ => Err(node_error(
                    node,
                    KernelError::Invalid("slice bounds overflow".into()),
                )),
            }
        }
        Op::Unsqueeze { axis } => view(t(0)?.unsqueeze(*axis)),
        Op::Expand { shape } => view(t(0)?.expand(&dims(shape, b)?)),
        Op::Get { index } => match value(0)? {
            Value::Tuple(ts) => ts
                .get(*index)
                .map(|t| done(Value::Tensor(t.clone()), false))
                .ok_or_else(|| {
                    node_error(
                        node,
                        KernelError::Invalid(format!("no element {index} in the tuple")),
                    )
                }),
            _ => Err(node_error(
                node,
                KernelError::Invalid("operand is not a tuple".into()),
            )),
        },
        Op::Dequant { to, act } => {
            let q = QuantWeight::new(t(0)?.into_owned(), t(1)?.into_owned(), *to, *act)
                .map_err(kernel)?;
            Ok(done(Value::Quant(q), false))
        }
        Op::Fused(f) => match f {
            FusedOp::RmsNorm => launch(fused::rms_norm(&*t(0)?, &*t(1)?, scalar(2)?)),
            FusedOp::RmsNormLinear => {
                let n = ops.len().saturating_sub(3);
                // The weights on the stack when they fit, as for `cat`.
                let heap;
                let mut inline;
                let ws: &[GemvWeight<'_>] = if n == 0 {
                    &[]
                } else if n <= MAX_INLINE_OPERANDS {
                    inline = [gemv_w(3)?; MAX_INLINE_OPERANDS];
                    for (i, w) in inline.iter_mut().enumerate().take(n).skip(1) {
                        *w = gemv_w(3 + i)?;
                    }
                    &inline[..n]
                } else {
                    heap = (3..ops.len())
                        .map(gemv_w)
                        .collect::<Result<Vec<_>, Error>>()?;
                    &heap
                };
                let mut outs =
                    fused::rms_norm_linear(&*t(0)?, &*t(1)?, scalar(2)?, ws).map_err(kernel)?;
                let value = if outs.len() == 1 {
                    let single = outs.swap_remove(0);
                    // The emptied list goes back to the pool for the next kernel.
                    pool::give_tensors(outs);
                    Value::Tensor(single)
                } else {
                    Value::Tuple(outs)
                };
                Ok(done(value, true))
            }
            FusedOp::MultiLinear => {
                let n = ops.len().saturating_sub(1);
                // The weights on the stack when they fit, as for `rms_norm_linear`.
                let heap;
                let mut inline;
                let ws: &[GemvWeight<'_>] = if n == 0 {
                    &[]
                } else if n <= MAX_INLINE_OPERANDS {
                    inline = [gemv_w(1)?; MAX_INLINE_OPERANDS];
                    for (i, w) in inline.iter_mut().enumerate().take(n).skip(1) {
                        *w = gemv_w(1 + i)?;
                    }
                    &inline[..n]
                } else {
                    heap = (1..ops.len())
                        .map(gemv_w)
                        .collect::<Result<Vec<_>, Error>>()?;
                    &heap
                };
                let outs = fused::multi_linear(&*t(0)?, ws).map_err(kernel)?;
                Ok(done(Value::Tuple(outs), true))
            }
            FusedOp::Swiglu => launch(fused::swiglu(&*t(0)?, gemv_w(1)?, gemv_w(2)?)),
            FusedOp::RmsNormSwiglu => launch(fused::rms_norm_swiglu(
                &*t(0)?,
                &*t(1)?,
                scalar(2)?,
                gemv_w(3)?,
                gemv_w(4)?,
            )),
            FusedOp::PostRmsNorm => {
                let residual = match ops.len() {
                    3 => None,
                    _ => Some(t(3)?),
                };
                launch(fused::post_rms_norm(
                    &*t(0)?,
                    &*t(1)?,
                    scalar(2)?,
                    residual.as_deref(),
                ))
            }
            FusedOp::LinearPostRmsNorm => launch(fused::linear_post_rms_norm(
                &*t(0)?,
                gemv_w(1)?,
                &*t(2)?,
                scalar(3)?,
                &*t(4)?,
            )),
            FusedOp::LinearAdd => launch(fused::linear_add(&*t(0)?, gemv_w(1)?, &*t(2)?)),
            FusedOp::LinearScaleAdd => launch(fused::linear_scale_add(
                &*t(0)?,
                gemv_w(1)?,
                scalar(2)?,
                &*t(3)?,
            )),
            FusedOp::Rope => launch(fused::rope(&*t(0)?, &*t(1)?, &*t(2)?)),
            FusedOp::Attention => launch(attention::attention(
                &*t(0)?,
                &*t(1)?,
                &*t(2)?,
                scalar(3)?,
                &*t(4)?,
                None,
            )),
            FusedOp::KvAppend => {
                let new = t(1)?;
                let mut past = ops.take_tensor(node, 0)?;
                let result = attention::kv_append(&mut past, &new);
                let past_bytes = past.bytes();
                ops.give_back(0, past);
                let (all, copied) = result.map_err(kernel)?;
                // Only the new entries are read and written, plus any copy made to grow.
                let written = all.bytes().saturating_sub(past_bytes) + copied;
                Ok(Outcome {
                    value: Value::Tensor(all),
                    launched: true,
                    traffic: Some((new.read_bytes() + copied, written)),
                })
            }
            FusedOp::DecodeAttention => {
                let fp8_scales = match ops.len() {
                    9 => None,
                    11 => Some((scalar(9)?, scalar(10)?)),
                    n => {
                        return Err(node_error(
                            node,
                            KernelError::Invalid(format!("takes 9 or 11 operands, got {n}")),
                        ))
                    }
                };
                let (q, k, v, cos, sin) = (t(0)?, t(1)?, t(2)?, t(3)?, t(4)?);
                let (scale, mask) = (scalar(7)?, t(8)?);
                let mut past_k = ops.take_tensor(node, 5)?;
                let mut past_v = ops.take_tensor(node, 6)?;
                let past_bytes = past_k.bytes() + past_v.bytes();
                let past_read = past_k.read_bytes() + past_v.read_bytes();
                let result = attention::decode_attention(
                    &q,
                    &k,
                    &v,
                    &cos,
                    &sin,
                    Caches {
                        past_k: &mut past_k,
                        past_v: &mut past_v,
                        scales: fp8_scales,
                    },
                    scale,
                    &mask,
                );
                ops.give_back(5, past_k);
                ops.give_back(6, past_v);
                let (results, copied) = result.map_err(kernel)?;
                let mut list = pool::tensors(results.len());
                list.extend(results);
                let value = Value::Tuple(list);
                // Attention reads the whole caches; the append writes the new entries
                // only, plus any copy made to grow.
                let read = ops.borrowed_read_bytes() + past_read + copied;
                let written = value.bytes().saturating_sub(past_bytes) + copied;
                Ok(Outcome {
                    value,
                    launched: true,
                    traffic: Some((read, written)),
                })
            }
        },
    }
}
