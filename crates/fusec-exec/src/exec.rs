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
//! nothing for a scalar kernel argument; the gathered rows for an embedding table).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::time::Instant;

use fusec_ir::op::resolve_axis;
use fusec_ir::shape::{Bindings, Shape};
use fusec_ir::{verify, Graph, NodeId, Op, OutputKind, TensorType, Type};

use crate::error::Error;
use crate::kernels::elementwise::Arg;
use crate::kernels::{constant, elementwise, gather, matmul, movement, reduce, KernelError};
use crate::profile::{NodeStats, StepStats};
use crate::tensor::{Tensor, TensorError};
use crate::weights::Weights;
use crate::{dtype, pool};

/// A runtime value: a tensor, a scalar kernel argument, or the results of a
/// multi-result (fused) op, read with `get`.
#[derive(Clone, Debug)]
pub enum Value {
    Tensor(Tensor),
    Scalar(f32),
    Tuple(Vec<Tensor>),
}

impl Value {
    /// The tensor, if this is one.
    pub fn tensor(&self) -> Option<&Tensor> {
        match self {
            Value::Tensor(t) => Some(t),
            Value::Scalar(_) | Value::Tuple(_) => None,
        }
    }

    pub fn into_tensor(self) -> Option<Tensor> {
        match self {
            Value::Tensor(t) => Some(t),
            Value::Scalar(_) | Value::Tuple(_) => None,
        }
    }

    /// Bytes a kernel reads when it reads this value once.
    fn read_bytes(&self) -> u64 {
        match self {
            Value::Tensor(t) => t.read_bytes(),
            Value::Scalar(_) => 0,
            Value::Tuple(ts) => ts.iter().map(Tensor::read_bytes).sum(),
        }
    }

    /// Bytes a kernel writes when it produces this value.
    fn bytes(&self) -> u64 {
        match self {
            Value::Tensor(t) => t.bytes(),
            Value::Scalar(_) => 4,
            Value::Tuple(ts) => ts.iter().map(Tensor::bytes).sum(),
        }
    }
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
    /// The value of a leaf bound when the executor is built (weights, constants).
    bound: Option<Value>,
}

/// The graph's outputs after one step, with the step's measurements.
#[derive(Debug)]
pub struct RunOutput {
    pub outputs: Vec<(String, OutputKind, Value)>,
    pub stats: StepStats,
}

impl RunOutput {
    /// The output called `name`.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.outputs
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, v)| v)
    }
}

/// Runs one graph on the CPU, step after step. See the module documentation.
#[derive(Debug)]
pub struct Executor {
    graph: Graph,
    plan: Vec<Planned>,
    outputs: Vec<(String, OutputKind, usize)>,
    input_names: HashSet<String>,
    /// Reused across steps so a step allocates no slot table.
    slots: Vec<Option<Value>>,
}

fn node_error(node: &Planned, source: KernelError) -> Error {
    Error::Node {
        node: node.number,
        op: node.op.to_string(),
        source,
    }
}

/// The concrete dimensions of `shape` under `b`.
fn dims(shape: &Shape, b: &Bindings) -> Result<Vec<usize>, Error> {
    let dims = shape.eval(b).map_err(|e| Error::Unbound(e.0))?;
    dims.into_iter()
        .map(|d| {
            usize::try_from(d)
                .map_err(|_| Error::InvalidGraph(format!("dimension {d} does not fit in memory")))
        })
        .collect()
}

/// Whether `t` has the dtype and shape of `ty` under `b`.
fn matches_type(t: &Tensor, ty: &TensorType, b: &Bindings) -> Result<bool, Error> {
    Ok(t.dtype() == ty.dtype && t.shape() == dims(&ty.shape, b)?.as_slice())
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
                bound: None,
            };
            planned.bound = match &node.op {
                Op::Weight { name } => {
                    let ty = node.tensor_type().ok_or_else(|| {
                        Error::InvalidGraph(format!("weight `{name}` has a tuple type"))
                    })?;
                    Some(Value::Tensor(weights.bind(name, ty)?))
                }
                Op::RopeInvFreq { theta, head_dim } => {
                    let t = constant::rope_inv_freq(theta.0, *head_dim)
                        .map_err(|e| node_error(&planned, e))?;
                    Some(Value::Tensor(t))
                }
                _ => None,
            };
            plan.push(planned);
        }
        let outputs: Vec<(String, OutputKind, usize)> = graph
            .outputs()
            .iter()
            .map(|o| (o.name.clone(), o.kind, slot[&o.value]))
            .collect();
        for (_, _, s) in &outputs {
            last_use[*s] = usize::MAX;
        }
        for (s, &pos) in last_use.iter().enumerate() {
            if pos != usize::MAX {
                plan[pos].free.push(s);
            }
        }
        let input_names = graph
            .inputs()
            .iter()
            .map(|(_, n, _)| n.to_string())
            .collect();
        let slots = vec![None; plan.len()];
        Ok(Executor {
            graph,
            plan,
            outputs,
            input_names,
            slots,
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Runs one step. `inputs` gives every `input` and `state` leaf by name, with the
    /// dtype and shape its type has under `bindings`.
    pub fn run(
        &mut self,
        bindings: &Bindings,
        mut inputs: HashMap<String, Tensor>,
    ) -> Result<RunOutput, Error> {
        if let Some(extra) = inputs.keys().find(|n| !self.input_names.contains(*n)) {
            return Err(Error::BadInput {
                name: extra.clone(),
                message: "not an input of the graph".into(),
            });
        }
        let step_start = Instant::now();
        let mut slots = std::mem::take(&mut self.slots);
        let result = self.run_plan(bindings, &mut inputs, &mut slots);
        let outputs = result.map(|mut stats| {
            let outputs = self
                .outputs
                .iter()
                .filter_map(|(name, kind, s)| slots[*s].clone().map(|v| (name.clone(), *kind, v)))
                .collect();
            stats.time = step_start.elapsed();
            RunOutput { outputs, stats }
        });
        slots.iter_mut().filter_map(Option::take).for_each(recycle);
        self.slots = slots;
        outputs
    }

    fn run_plan(
        &self,
        b: &Bindings,
        inputs: &mut HashMap<String, Tensor>,
        slots: &mut [Option<Value>],
    ) -> Result<StepStats, Error> {
        let mut stats = StepStats {
            nodes: Vec::with_capacity(self.plan.len()),
            ..StepStats::default()
        };
        for (pos, node) in self.plan.iter().enumerate() {
            let mut args: Vec<&Value> = Vec::with_capacity(node.operands.len());
            for &o in &node.operands {
                let v = slots[o].as_ref().ok_or_else(|| {
                    Error::InvalidGraph(format!("operand %{o} freed before its last use"))
                })?;
                args.push(v);
            }
            let start = Instant::now();
            let (value, launched) = dispatch(node, &args, inputs, b)?;
            let time = start.elapsed();
            check_result(node, &value, b)?;
            if launched {
                let bytes_read = read_bytes(&node.op, &args);
                let bytes_written = value.bytes();
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
        Ok(stats)
    }
}

/// Returns the buffers of a dropped value to the pool (those no other value shares).
pub(crate) fn recycle(v: Value) {
    match v {
        Value::Tensor(t) => pool::recycle(t),
        Value::Tuple(ts) => ts.into_iter().for_each(pool::recycle),
        Value::Scalar(_) => {}
    }
}

/// Bytes a launched op reads from its operands.
fn read_bytes(op: &Op, args: &[&Value]) -> u64 {
    match (op, args) {
        (Op::Embedding, [Value::Tensor(table), Value::Tensor(ids)]) => {
            // A gather reads one table row per id.
            let row = table.shape().get(1).copied().unwrap_or(0) as u64;
            ids.numel() as u64 * row * table.dtype().size_bytes() + ids.read_bytes()
        }
        _ => args.iter().map(|v| v.read_bytes()).sum(),
    }
}

/// Checks a node's runtime value against its IR type: a mismatch is an executor bug.
fn check_result(node: &Planned, value: &Value, b: &Bindings) -> Result<(), Error> {
    let ok = match (value, &node.ty) {
        (Value::Tensor(t), Type::Tensor(ty)) => matches_type(t, ty, b)?,
        (Value::Scalar(_), Type::Tensor(ty)) => {
            ty.dtype == fusec_ir::DType::F32 && ty.shape.rank() == 0
        }
        (Value::Tuple(ts), Type::Tuple(tys)) => {
            ts.len() == tys.len()
                && ts
                    .iter()
                    .zip(tys)
                    .map(|(t, ty)| matches_type(t, ty, b))
                    .collect::<Result<Vec<bool>, Error>>()?
                    .into_iter()
                    .all(|ok| ok)
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
fn tensor_arg<'a>(node: &Planned, args: &[&'a Value], i: usize) -> Result<Cow<'a, Tensor>, Error> {
    match args.get(i) {
        Some(Value::Tensor(t)) => Ok(Cow::Borrowed(t)),
        Some(Value::Scalar(v)) => Ok(Cow::Owned(Tensor::scalar(*v))),
        Some(Value::Tuple(_)) => Err(node_error(
            node,
            KernelError::Invalid(format!("operand {i} is a tuple")),
        )),
        None => Err(node_error(
            node,
            KernelError::Invalid(format!("missing operand {i}")),
        )),
    }
}

fn binary_arg<'a>(node: &Planned, args: &[&'a Value], i: usize) -> Result<Arg<'a>, Error> {
    match args.get(i) {
        Some(Value::Tensor(t)) => Ok(Arg::Tensor(t)),
        Some(Value::Scalar(v)) => Ok(Arg::Scalar(*v)),
        _ => Err(node_error(
            node,
            KernelError::Invalid(format!("operand {i} is not a tensor")),
        )),
    }
}

/// Evaluates one node: the single place that matches on every op. Returns the value
/// and whether a kernel ran.
fn dispatch(
    node: &Planned,
    args: &[&Value],
    inputs: &mut HashMap<String, Tensor>,
    b: &Bindings,
) -> Result<(Value, bool), Error> {
    let t = |i: usize| tensor_arg(node, args, i);
    let launch = |r: Result<Tensor, KernelError>| -> Result<(Value, bool), Error> {
        r.map(|t| (Value::Tensor(t), true))
            .map_err(|e| node_error(node, e))
    };
    let view = |r: Result<Tensor, TensorError>| -> Result<(Value, bool), Error> {
        r.map(|t| (Value::Tensor(t), false))
            .map_err(|e| node_error(node, e.into()))
    };
    let axis = |axis: i64, i: usize| -> Result<usize, Error> {
        let rank = args.get(i).and_then(|v| v.tensor()).map_or(0, Tensor::rank);
        resolve_axis(axis, rank).map_err(|m| node_error(node, KernelError::Invalid(m)))
    };
    let bound = || {
        node.bound
            .clone()
            .map(|v| (v, false))
            .ok_or_else(|| Error::InvalidGraph(format!("leaf {} was not bound at load", node.op)))
    };
    match &node.op {
        Op::Input { name, .. } => {
            let ty = node
                .ty
                .tensor()
                .ok_or_else(|| Error::InvalidGraph(format!("input `{name}` has a tuple type")))?;
            let tensor = inputs.remove(name).ok_or_else(|| Error::BadInput {
                name: name.clone(),
                message: format!("missing (expected {ty})"),
            })?;
            if !matches_type(&tensor, ty, b)? {
                return Err(Error::BadInput {
                    name: name.clone(),
                    message: format!(
                        "expected {}{:?}, got {}",
                        ty.dtype,
                        dims(&ty.shape, b)?,
                        describe(&tensor)
                    ),
                });
            }
            Ok((Value::Tensor(tensor), false))
        }
        Op::Weight { .. } | Op::RopeInvFreq { .. } => bound(),
        Op::Scalar { value } => Ok((Value::Scalar(value.0 as f32), false)),
        Op::Unary(u) => launch(elementwise::unary(*u, &*t(0)?)),
        Op::Binary(op) => launch(elementwise::binary(
            *op,
            binary_arg(node, args, 0)?,
            binary_arg(node, args, 1)?,
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
        Op::Linear => launch(matmul::linear(&*t(0)?, &*t(1)?)),
        Op::Embedding => launch(gather::embedding(&*t(0)?, &*t(1)?)),
        Op::Cat { axis: a } => {
            let parts = (0..args.len()).map(t).collect::<Result<Vec<_>, Error>>()?;
            let refs: Vec<&Tensor> = parts.iter().map(|p| p.as_ref()).collect();
            launch(movement::cat(&refs, axis(*a, 0)?))
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
        Op::Get { index } => match args.first() {
            Some(Value::Tuple(ts)) => ts
                .get(*index)
                .map(|t| (Value::Tensor(t.clone()), false))
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
        // Fused kernels and FP8 weights come with the fusion and FP8 work; until then
        // such graphs are rejected with a clear error rather than run wrongly.
        Op::Fused(f) => Err(node_error(
            node,
            KernelError::Invalid(format!(
                "the CPU executor has no kernel for {} yet",
                f.name()
            )),
        )),
        Op::Dequant { .. } => Err(node_error(
            node,
            KernelError::Invalid("the CPU executor does not run FP8 weights yet".into()),
        )),
    }
}
