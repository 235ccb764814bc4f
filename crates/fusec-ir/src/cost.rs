//! What each node costs when it runs: kernel launches, bytes read and written, FLOPs.
//!
//! The counting rules, which the executor's measured counts must reproduce exactly:
//! - leaves (inputs, weights, scalars, load-time constants) and free views cost nothing;
//! - every other node is one kernel launch that writes its whole result;
//! - it reads each operand once, where reading through a chain of views costs the
//!   smaller of the view's and the underlying storage's size (an expanded tensor reads
//!   its source once); scalars are kernel arguments and read nothing;
//! - an embedding gather reads only the rows it gathers.
//!
//! The *memory floor* is what any implementation must move: every weight byte that some
//! op needs, the whole KV cache read, the new KV entries written, the graph's data
//! inputs and outputs.

use std::collections::HashMap;

use crate::graph::{Graph, NodeId, OutputKind};
use crate::op::{BinaryOp, InputKind, Op, ReduceOp};
use crate::shape::{Bindings, UnboundSymbol};
use crate::types::{TensorType, Type};

/// The cost of one node, or a sum of them.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Cost {
    pub launches: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub flops: u64,
}

impl Cost {
    pub fn bytes(&self) -> u64 {
        self.bytes_read + self.bytes_written
    }
}

impl std::ops::AddAssign for Cost {
    fn add_assign(&mut self, o: Cost) {
        self.launches += o.launches;
        self.bytes_read += o.bytes_read;
        self.bytes_written += o.bytes_written;
        self.flops += o.flops;
    }
}

fn tensor(ty: &Type) -> Option<&TensorType> {
    ty.tensor()
}

fn numel(ty: &Type, b: &Bindings) -> Result<u64, UnboundSymbol> {
    ty.tensors().iter().map(|t| t.shape.numel(b)).sum()
}

/// Bytes read when an op reads `value` once: through views, the smaller of the view's
/// size and its storage's size; nothing for a scalar.
pub fn read_bytes(graph: &Graph, value: NodeId, b: &Bindings) -> Result<u64, UnboundSymbol> {
    if matches!(graph.op(value), Op::Scalar { .. }) {
        return Ok(0);
    }
    let own = graph.ty(value).bytes(b)?;
    let mut base = value;
    while graph.op(base).is_view() && !matches!(graph.op(base), Op::Get { .. }) {
        base = graph.operands(base)[0];
    }
    if base == value {
        return Ok(own);
    }
    Ok(own.min(graph.ty(base).bytes(b)?))
}

/// The bytes of operand `index` of `id` that the op reads.
pub fn operand_read_bytes(
    graph: &Graph,
    id: NodeId,
    index: usize,
    operand: NodeId,
    b: &Bindings,
) -> Result<u64, UnboundSymbol> {
    if let (Op::Embedding, 0) = (graph.op(id), index) {
        // A gather reads one row of the table per id: as many bytes as it writes.
        return graph.ty(id).bytes(b);
    }
    read_bytes(graph, operand, b)
}

/// The cost of one node under `b`.
pub fn node_cost(graph: &Graph, id: NodeId, b: &Bindings) -> Result<Cost, UnboundSymbol> {
    let op = graph.op(id);
    if !op.launches_kernel() {
        return Ok(Cost::default());
    }
    let operands = graph.operands(id);
    let mut bytes_read = 0;
    for (i, &o) in operands.iter().enumerate() {
        bytes_read += operand_read_bytes(graph, id, i, o, b)?;
    }
    let out = graph.ty(id);
    let bytes_written = out.bytes(b)?;
    let n_out = numel(out, b)?;
    let n_in0 = match operands.first() {
        Some(&o) => numel(graph.ty(o), b)?,
        None => 0,
    };
    let flops = match op {
        Op::Unary(u) => n_out * u.flops_per_element(),
        Op::Binary(BinaryOp::Pow) => n_out * 2,
        Op::Binary(_) => n_out,
        Op::Reduce { kind, .. } => n_in0 + if *kind == ReduceOp::Mean { n_out } else { 0 },
        Op::Argmax { .. } => n_in0,
        Op::Softmax { .. } => 5 * n_out,
        Op::MatMul => {
            let k = contracted(graph.ty(operands[0]), b, 1)?;
            2 * n_out * k
        }
        Op::Linear => {
            let k = contracted(graph.ty(operands[1]), b, 1)?;
            2 * n_out * k
        }
        _ => 0,
    };
    Ok(Cost {
        launches: 1,
        bytes_read,
        bytes_written,
        flops,
    })
}

/// Dimension `from_end` counted from the last (1 = last) of a tensor type.
fn contracted(ty: &Type, b: &Bindings, from_end: usize) -> Result<u64, UnboundSymbol> {
    match tensor(ty) {
        Some(t) if t.rank() >= from_end => t.shape.dim(t.rank() - from_end).eval(b),
        _ => Ok(0),
    }
}

/// Costs summed over a graph, with the per-layer figures and the memory floor.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct GraphCost {
    pub total: Cost,
    /// The sum over nodes that belong to a decoder layer.
    pub in_layers: Cost,
    pub layers: u32,
    pub floor: Floor,
    /// The cost of each kernel-launching node, in canonical order.
    #[serde(skip)]
    pub nodes: Vec<(NodeId, Cost)>,
}

impl GraphCost {
    /// Average launches per decoder layer.
    pub fn launches_per_layer(&self) -> f64 {
        if self.layers == 0 {
            0.0
        } else {
            self.in_layers.launches as f64 / f64::from(self.layers)
        }
    }

    /// Bytes moved over the floor.
    pub fn floor_ratio(&self) -> f64 {
        if self.floor.total() == 0 {
            0.0
        } else {
            self.total.bytes() as f64 / self.floor.total() as f64
        }
    }
}

/// The least traffic any implementation of the step must move.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Floor {
    pub weight_bytes: u64,
    pub kv_read_bytes: u64,
    pub kv_write_bytes: u64,
    /// Data inputs read and data outputs written (ids, positions, mask, logits).
    pub io_bytes: u64,
}

impl Floor {
    pub fn total(&self) -> u64 {
        self.weight_bytes + self.kv_read_bytes + self.kv_write_bytes + self.io_bytes
    }
}

/// Sums the costs of every node and computes the floor.
pub fn graph_cost(graph: &Graph, b: &Bindings) -> Result<GraphCost, UnboundSymbol> {
    let order = graph
        .topo_order()
        .unwrap_or_else(|_| graph.node_ids().collect());
    let mut cost = GraphCost {
        layers: graph.layers(),
        ..GraphCost::default()
    };
    // For each weight, the most of it that any one consumer reads.
    let mut weight_read: HashMap<NodeId, u64> = HashMap::new();
    for &id in &order {
        let c = node_cost(graph, id, b)?;
        if c.launches > 0 {
            cost.total += c;
            if graph.node(id).layer.is_some() {
                cost.in_layers += c;
            }
            cost.nodes.push((id, c));
            for (i, o) in graph.operands(id).into_iter().enumerate() {
                let mut base = o;
                while graph.op(base).is_view() && !matches!(graph.op(base), Op::Get { .. }) {
                    base = graph.operands(base)[0];
                }
                if matches!(graph.op(base), Op::Weight { .. }) {
                    let bytes = operand_read_bytes(graph, id, i, o, b)?;
                    let e = weight_read.entry(base).or_default();
                    *e = (*e).max(bytes);
                }
            }
        }
    }
    cost.floor.weight_bytes = weight_read.values().sum();
    let mut state_in = HashMap::new();
    for (id, name, kind) in graph.inputs() {
        let bytes = graph.ty(id).bytes(b)?;
        match kind {
            InputKind::Data => cost.floor.io_bytes += bytes,
            InputKind::State => {
                cost.floor.kv_read_bytes += bytes;
                state_in.insert(name.to_string(), bytes);
            }
        }
    }
    for o in graph.outputs() {
        let bytes = graph.ty(o.value).bytes(b)?;
        match o.kind {
            OutputKind::Data => cost.floor.io_bytes += bytes,
            OutputKind::State => {
                let before = state_in.get(&o.name).copied().unwrap_or(0);
                cost.floor.kv_write_bytes += bytes.saturating_sub(before);
            }
        }
    }
    Ok(cost)
}
