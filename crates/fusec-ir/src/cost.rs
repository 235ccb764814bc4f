//! What each node costs when it runs: kernel launches, bytes read and written, FLOPs.
//!
//! The counting rules, which the executor's measured counts must reproduce exactly:
//! - leaves (inputs, weights, scalars, load-time constants) and free views cost nothing;
//! - every other node is one kernel launch that writes its whole result;
//! - it reads each operand once, where reading through a chain of views costs the
//!   smaller of the view's and the underlying storage's size (an expanded tensor reads
//!   its source once); scalars are kernel arguments and read nothing;
//! - an embedding gather reads only the rows it gathers;
//! - a paged attention reads its pools at the positions its rows attend, from the
//!   lengths bound for them (`step::SEQ_LEN`, per row `step::seq_len`; a sliding
//!   window's layers at most the window), and writes the new entries only. CUDA
//!   launches it as two kernels (`Op::cuda_launches`), which [`GraphCost`] counts
//!   apart from the CPU executor's one launch per node.
//!
//! The *memory floor* is what any implementation must move: every weight byte that some
//! op needs, the whole KV cache read (a paged pool: the positions attended), the new
//! KV entries written, the graph's data inputs and outputs.

use std::collections::{HashMap, HashSet};

use crate::graph::{Graph, NodeId, OutputKind};
use crate::op::{BinaryOp, Execution, FusedOp, InputKind, Op, OperandRole, ReduceOp};
use crate::shape::{Bindings, UnboundSymbol};
use crate::step;
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
        self.bytes_read.saturating_add(self.bytes_written)
    }
}

impl std::ops::AddAssign for Cost {
    fn add_assign(&mut self, o: Cost) {
        // Saturating: a count never wraps around to a small one.
        self.launches = self.launches.saturating_add(o.launches);
        self.bytes_read = self.bytes_read.saturating_add(o.bytes_read);
        self.bytes_written = self.bytes_written.saturating_add(o.bytes_written);
        self.flops = self.flops.saturating_add(o.flops);
    }
}

fn tensor(ty: &Type) -> Option<&TensorType> {
    ty.tensor()
}

fn numel(ty: &Type, b: &Bindings) -> Result<u64, UnboundSymbol> {
    ty.tensors()
        .iter()
        .try_fold(0u64, |n, t| Ok(n.saturating_add(t.shape.numel(b)?)))
}

/// Bytes read when an op reads `value` once: through views, the smaller of the view's
/// size and its storage's size; nothing for a scalar.
pub fn read_bytes(graph: &Graph, value: NodeId, b: &Bindings) -> Result<u64, UnboundSymbol> {
    let op = graph.op(value);
    if let Op::Scalar { .. } = op {
        return Ok(0);
    }
    if op.info().execution == Execution::Folded {
        // A folded value (a quantized weight) is read as stored: its operands, the
        // values and their scales.
        let mut total = 0;
        for o in graph.operands(value) {
            total += read_bytes(graph, o, b)?;
        }
        return Ok(total);
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
    match graph.op(id).operand_role(index) {
        // An in-place append leaves the cached entries where they are.
        Some(OperandRole::Cache { reads: false, .. }) => Ok(0),
        // A gather reads one row of the table per id: as many bytes as it writes.
        Some(OperandRole::EmbeddingTable) => graph.ty(id).bytes(b),
        // A paged pool is read only through the block table: the positions the rows
        // hold (`step::SEQ_LEN`, capped by a window), or where their lengths are not
        // bound at most the blocks the table's `B x M` entries name.
        Some(OperandRole::Cache { reads: true, .. }) if is_paged(graph.op(id)) => {
            let whole = read_bytes(graph, operand, b)?;
            let (Some(p), Some(t)) = (
                graph.ty(operand).tensor(),
                paged_table(graph, id).and_then(|t| graph.ty(t).tensor()),
            ) else {
                return Ok(whole);
            };
            if p.rank() != 4 || t.rank() != 2 {
                return Ok(whole);
            }
            let blocks = p.shape.dim(0).eval(b)?.max(1);
            let block_size = p.shape.dim(2).eval(b)?.max(1);
            let (rows, width) = (t.shape.dim(0).eval(b)?, t.shape.dim(1).eval(b)?);
            let reach = width.saturating_mul(block_size);
            let per_block = whole / blocks;
            Ok(
                match step::paged_positions(b, rows, reach, paged_window(graph, id)) {
                    Some(positions) => (per_block / block_size).saturating_mul(positions),
                    None => whole.min(per_block.saturating_mul(rows.saturating_mul(width))),
                },
            )
        }
        _ => read_bytes(graph, operand, b),
    }
}

fn is_paged(op: &Op) -> bool {
    matches!(
        op,
        Op::Fused(FusedOp::PagedAttention | FusedOp::PagedDecodeAttention)
    )
}

/// The block table a paged attention `id` reads (its first `Paging` operand).
fn paged_table(graph: &Graph, id: NodeId) -> Option<NodeId> {
    graph
        .operands(id)
        .into_iter()
        .enumerate()
        .find(|&(i, _)| graph.op(id).operand_role(i) == Some(OperandRole::Paging))
        .map(|(_, t)| t)
}

/// The sliding window of a paged attention `id`, which its block table's name says
/// (`step::window_block_table`).
fn paged_window(graph: &Graph, id: NodeId) -> Option<u64> {
    match graph.op(paged_table(graph, id)?) {
        Op::Input { name, .. } => step::table_window(name).flatten(),
        _ => None,
    }
}

/// The cost of one node under `b`.
pub fn node_cost(graph: &Graph, id: NodeId, b: &Bindings) -> Result<Cost, UnboundSymbol> {
    let op = graph.op(id);
    if !op.launches_kernel() {
        return Ok(Cost::default());
    }
    let operands = graph.operands(id);
    let mut reads = Vec::with_capacity(operands.len());
    for (i, &o) in operands.iter().enumerate() {
        reads.push(operand_read_bytes(graph, id, i, o, b)?);
    }
    let types: Vec<&Type> = operands.iter().map(|&o| graph.ty(o)).collect();
    cost_of(op, &types, &reads, graph.ty(id), b, paged_window(graph, id))
}

/// The cost of running `op` on operands of the given types, of which it reads
/// `reads[i]` bytes each, producing `out`. Shared by the graph and the e-graph's
/// extraction, so that extraction optimises what the report counts.
pub fn op_cost(
    op: &Op,
    operands: &[&Type],
    reads: &[u64],
    out: &Type,
    b: &Bindings,
) -> Result<Cost, UnboundSymbol> {
    cost_of(op, operands, reads, out, b, None)
}

/// [`op_cost`] for a paged attention whose layer has a sliding `window` (which only
/// the graph says, by its block table's name).
fn cost_of(
    op: &Op,
    operands: &[&Type],
    reads: &[u64],
    out: &Type,
    b: &Bindings,
    window: Option<u64>,
) -> Result<Cost, UnboundSymbol> {
    if !op.launches_kernel() {
        return Ok(Cost::default());
    }
    let mut bytes_written = out.bytes(b)?;
    // The appended caches are written in place: only the new entries are stored (one
    // position of a sliding-window ring, also once it is full).
    for (past, result) in op.in_place() {
        if let (Some(grown), Some(Type::Tensor(before))) =
            (out.tensors().get(result), operands.get(past))
        {
            bytes_written =
                bytes_written.saturating_sub(grown.bytes(b)?) + grown.appended_bytes(before, b)?;
        }
    }
    // A paged pool keeps its shape; what the step writes into it is one entry per
    // sequence, the new k and v (operands 1 and 2).
    if is_paged(op) {
        for new in operands.iter().skip(1).take(2) {
            bytes_written = bytes_written.saturating_add(new.bytes(b)?);
        }
    }
    let n_out = numel(out, b)?;
    let n_in0 = match operands.first() {
        Some(t) => numel(t, b)?,
        None => 0,
    };
    let flops = match op {
        Op::Unary(u) => n_out * u.flops_per_element(),
        Op::Binary(BinaryOp::Pow) => n_out * 2,
        Op::Binary(_) => n_out,
        Op::Reduce { kind, .. } => n_in0 + if *kind == ReduceOp::Mean { n_out } else { 0 },
        Op::Argmax { .. } => n_in0,
        Op::Softmax { .. } => 5 * n_out,
        // Products of three sizes: saturating, never wrapping (the frontends' limits
        // keep real models far below; a hand-written graph may not be).
        Op::MatMul => (2 * n_out).saturating_mul(last_dim(operands[0], b)?),
        Op::Linear => (2 * n_out).saturating_mul(last_dim(operands[1], b)?),
        Op::Fused(f) => fused_flops(*f, operands, n_out, n_in0, b, window)?,
        // Data movement and conversions are charged bytes, not FLOPs.
        Op::Input { .. }
        | Op::Weight { .. }
        | Op::Scalar { .. }
        | Op::RopeInvFreq { .. }
        | Op::RopeInvFreqLlama3 { .. }
        | Op::Cast { .. }
        | Op::Embedding
        | Op::Cat { .. }
        | Op::Copy
        | Op::Reshape { .. }
        | Op::Transpose { .. }
        | Op::Slice { .. }
        | Op::Unsqueeze { .. }
        | Op::Expand { .. }
        | Op::Get { .. }
        | Op::Dequant { .. } => 0,
    };
    Ok(Cost {
        launches: 1,
        bytes_read: reads.iter().fold(0, |a, &v| a.saturating_add(v)),
        bytes_written,
        flops,
    })
}

/// FLOPs of a fused kernel: its GEMVs and attention dominate; elementwise work is
/// charged as in the primitive ops it replaces.
fn fused_flops(
    f: FusedOp,
    operands: &[&Type],
    n_out: u64,
    n_in0: u64,
    b: &Bindings,
    window: Option<u64>,
) -> Result<u64, UnboundSymbol> {
    // 2 FLOPs per weight element per row of x (operand 0).
    let rows = n_in0 / last_dim(operands[0], b)?.max(1);
    let gemv =
        |w: &Type| -> Result<u64, UnboundSymbol> { Ok((2 * rows).saturating_mul(numel(w, b)?)) };
    Ok(match f {
        FusedOp::KvAppend => 0,
        FusedOp::Rope => 3 * n_out,
        FusedOp::RmsNorm => 5 * n_out,
        FusedOp::PostRmsNorm => (5 + operands.len().saturating_sub(3) as u64) * n_out,
        // The offset add and the multiply by the offset weight, and the residual add.
        FusedOp::OffsetRmsNorm => (6 + operands.len().saturating_sub(4) as u64) * n_out,
        FusedOp::RmsNormLinear => {
            let mut total = 4 * n_in0;
            for w in &operands[3..] {
                total += gemv(w)?;
            }
            total
        }
        FusedOp::OffsetRmsNormLinear => {
            let mut total = 5 * n_in0;
            for w in &operands[4..] {
                total += gemv(w)?;
            }
            total
        }
        FusedOp::OffsetRmsNormGeglu => {
            5 * n_in0 + gemv(operands[4])? + gemv(operands[5])? + 12 * n_out
        }
        FusedOp::MultiLinear => {
            let mut total = 0;
            for w in &operands[1..] {
                total += gemv(w)?;
            }
            total
        }
        FusedOp::Swiglu => gemv(operands[1])? + gemv(operands[2])? + 8 * n_out,
        FusedOp::Geglu => gemv(operands[1])? + gemv(operands[2])? + 12 * n_out,
        FusedOp::RmsNormSwiglu => 4 * n_in0 + gemv(operands[3])? + gemv(operands[4])? + 8 * n_out,
        FusedOp::LinearAdd => gemv(operands[1])? + n_out,
        FusedOp::LinearScaleAdd => gemv(operands[1])? + 2 * n_out,
        FusedOp::LinearPostRmsNorm => gemv(operands[1])? + 6 * n_out,
        FusedOp::LinearOffsetRmsNorm => gemv(operands[1])? + 7 * n_out,
        FusedOp::Attention | FusedOp::DecodeAttention | FusedOp::DecodeAttentionCapped => {
            let (k, extra) = if f == FusedOp::Attention {
                (operands[1], 0)
            } else {
                (operands[5], 1)
            };
            // q k^T and p v: 2 * 2 * (query elements) * (cache length), plus softmax.
            let len = match tensor(k) {
                Some(t) if t.rank() >= 2 => t.shape.dim(t.rank() - 2).eval(b)? + extra,
                _ => 0,
            };
            let hd = last_dim(operands[0], b)?.max(1);
            // Gemma 2's soft-cap (a sixth operand of `fused.attention`): a division, a
            // tanh and a product per score.
            let capped = match f {
                FusedOp::Attention => operands.len() == 6,
                _ => f == FusedOp::DecodeAttentionCapped,
            };
            let cap = if capped { 8 } else { 0 };
            (4 * n_in0)
                .saturating_mul(len)
                .saturating_add(((5 + cap) * (n_in0 / hd)).saturating_mul(len))
        }
        FusedOp::PagedAttention | FusedOp::PagedDecodeAttention => {
            // The paged decode kernel's operands after RoPE's tables line up with the
            // plain one's from its caches on.
            let at = |i: usize| match f {
                FusedOp::PagedAttention => operands[i],
                _ => operands[i + 2],
            };
            // As decode attention, over the positions the rows hold (`step::SEQ_LEN`,
            // capped by the window); where their lengths are not bound, over every
            // position the block table can address (`M * BS`), an upper bound.
            let (rows, reach) = match (tensor(at(5)), tensor(at(3))) {
                (Some(table), Some(pool)) if table.rank() == 2 && pool.rank() == 4 => (
                    table.shape.dim(0).eval(b)?,
                    table
                        .shape
                        .dim(1)
                        .eval(b)?
                        .saturating_mul(pool.shape.dim(2).eval(b)?),
                ),
                _ => (0, 0),
            };
            // Operand 0 is `q` `[B,H,1,hd]`: per row, `n_in0 / rows` elements.
            let per_row = n_in0 / rows.max(1);
            let (q, positions) = match step::paged_positions(b, rows, reach, window) {
                Some(p) if rows > 0 => (per_row, p),
                _ => (n_in0, reach),
            };
            let hd = last_dim(operands[0], b)?.max(1);
            let rope = match f {
                FusedOp::PagedAttention => 0,
                _ => 3 * (n_in0 + numel(operands[1], b)?),
            };
            (4 * q)
                .saturating_mul(positions)
                .saturating_add((5 * (q / hd)).saturating_mul(positions))
                .saturating_add(rope)
        }
    })
}

/// The last dimension of a tensor type (0 for a scalar or a tuple).
fn last_dim(ty: &Type, b: &Bindings) -> Result<u64, UnboundSymbol> {
    match tensor(ty).and_then(|t| t.shape.last()) {
        Some(d) => d.eval(b),
        None => Ok(0),
    }
}

/// Costs summed over a graph, with the per-layer figures and the memory floor.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct GraphCost {
    pub total: Cost,
    /// The sum over nodes that belong to a decoder layer.
    pub in_layers: Cost,
    pub layers: u32,
    /// Kernels the CUDA backend launches for the step, and for its decoder layers:
    /// the launches of `total` and `in_layers` are the CPU executor's, one per
    /// launching node, and CUDA launches some nodes as more (`Op::cuda_launches`).
    pub cuda_launches: u64,
    pub cuda_launches_in_layers: u64,
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

    /// Average CUDA launches per decoder layer.
    pub fn cuda_launches_per_layer(&self) -> f64 {
        if self.layers == 0 {
            0.0
        } else {
            self.cuda_launches_in_layers as f64 / f64::from(self.layers)
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
        self.weight_bytes
            .saturating_add(self.kv_read_bytes)
            .saturating_add(self.kv_write_bytes)
            .saturating_add(self.io_bytes)
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
    // The state inputs a paged attention reads, counted with it.
    let mut paged_pools: HashSet<NodeId> = HashSet::new();
    for &id in &order {
        let c = node_cost(graph, id, b)?;
        if c.launches > 0 {
            cost.total += c;
            let cuda = graph.op(id).cuda_launches();
            cost.cuda_launches = cost.cuda_launches.saturating_add(cuda);
            if graph.node(id).layer.is_some() {
                cost.in_layers += c;
                cost.cuda_launches_in_layers = cost.cuda_launches_in_layers.saturating_add(cuda);
            }
            cost.nodes.push((id, c));
            if is_paged(graph.op(id)) {
                // Its pools are read at the positions attended and written at the new
                // entries only, as the node's own cost counts them.
                let operands = graph.operands(id);
                for (i, &o) in operands.iter().enumerate() {
                    if let Some(OperandRole::Cache { reads: true, .. }) =
                        graph.op(id).operand_role(i)
                    {
                        paged_pools.insert(o);
                        cost.floor.kv_read_bytes = cost
                            .floor
                            .kv_read_bytes
                            .saturating_add(operand_read_bytes(graph, id, i, o, b)?);
                    }
                }
                for &new in operands.iter().skip(1).take(2) {
                    cost.floor.kv_write_bytes = cost
                        .floor
                        .kv_write_bytes
                        .saturating_add(graph.ty(new).bytes(b)?);
                }
            }
            for (i, o) in graph.operands(id).into_iter().enumerate() {
                // A quantized weight credits its values and its scales.
                let read: Vec<(usize, NodeId)> =
                    if graph.op(o).info().execution == Execution::Folded {
                        graph
                            .operands(o)
                            .into_iter()
                            .map(|q| (usize::MAX, q))
                            .collect()
                    } else {
                        vec![(i, o)]
                    };
                for (index, o) in read {
                    let mut base = o;
                    while graph.op(base).is_view() && !matches!(graph.op(base), Op::Get { .. }) {
                        base = graph.operands(base)[0];
                    }
                    if matches!(graph.op(base), Op::Weight { .. }) {
                        let bytes = if index == usize::MAX {
                            read_bytes(graph, o, b)?
                        } else {
                            operand_read_bytes(graph, id, index, o, b)?
                        };
                        let e = weight_read.entry(base).or_default();
                        *e = (*e).max(bytes);
                    }
                }
            }
        }
    }
    cost.floor.weight_bytes = weight_read.values().fold(0, |a, &v| a.saturating_add(v));
    let mut state_in = HashMap::new();
    let mut paged_names = HashSet::new();
    for (id, name, kind) in graph.inputs() {
        let bytes = graph.ty(id).bytes(b)?;
        match kind {
            InputKind::Data => cost.floor.io_bytes += bytes,
            InputKind::State if paged_pools.contains(&id) => {
                paged_names.insert(name.to_string());
            }
            InputKind::State => {
                cost.floor.kv_read_bytes += bytes;
                state_in.insert(name.to_string(), graph.ty(id));
            }
        }
    }
    for o in graph.outputs() {
        let ty = graph.ty(o.value);
        match o.kind {
            OutputKind::Data => cost.floor.io_bytes += ty.bytes(b)?,
            OutputKind::State if paged_names.contains(&o.name) => {}
            OutputKind::State => {
                cost.floor.kv_write_bytes += match (ty, state_in.get(&o.name)) {
                    (Type::Tensor(grown), Some(Type::Tensor(before))) => {
                        grown.appended_bytes(before, b)?
                    }
                    _ => ty.bytes(b)?,
                };
            }
        }
    }
    Ok(cost)
}

/// The dtype whose peak a node's math runs at: FP8 for a GEMV whose weights are
/// `dequant{act=fp8...}` values (it multiplies FP8 by FP8), else its (first) result's.
pub fn math_dtype(graph: &Graph, id: NodeId) -> crate::DType {
    for o in graph.operands(id) {
        if let Op::Dequant { act, .. } = graph.op(o) {
            if act.is_fp8() || act.is_int_codes() {
                return *act;
            }
        }
    }
    graph
        .ty(id)
        .tensors()
        .first()
        .map_or(crate::DType::F32, |t| t.dtype)
}

/// Estimated seconds per step on `gpu`: every kernel's launch overhead (each of the
/// kernels CUDA launches for a node) plus the larger of its memory and math time,
/// summed.
pub fn estimate_seconds(graph: &Graph, cost: &GraphCost, gpu: &crate::hardware::GpuSpec) -> f64 {
    cost.nodes
        .iter()
        .map(|(id, c)| {
            // A node CUDA launches as more than one kernel pays each launch.
            let extra = graph.op(*id).cuda_launches().saturating_sub(1) as f64;
            gpu.kernel_seconds(c.bytes(), c.flops, math_dtype(graph, *id))
                + extra * gpu.launch_us * 1e-6
        })
        .sum()
}
