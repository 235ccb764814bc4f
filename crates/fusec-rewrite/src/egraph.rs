//! Graph to e-graph, and the extraction of the cheapest graph back out of it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use egg::{CostFunction, Extractor, Id, Language};
use fusec_ir::cost::op_cost;
use fusec_ir::hardware::GpuSpec;
use fusec_ir::{Bindings, FusedOp, Graph, NodeId, Op, OutputKind, Type};

use crate::analysis::{FGraph, TypeAnalysis};

/// Why extraction failed: an invariant of the e-graph broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    #[error("extracted node does not type-check: {0}")]
    Type(fusec_ir::op::TypeError),
    #[error("the extracted graph has a cycle")]
    Cycle,
}
use crate::lang::ENode;

/// The e-graph of a graph, with the e-class of every output.
#[derive(Debug)]
pub struct Loaded {
    pub egraph: FGraph,
    pub outputs: Vec<(String, OutputKind, Id)>,
}

/// Adds every node of `graph` to a fresh e-graph, in canonical order. A class's origin
/// is its node's position in the eager graph's text form (`%N`), from `positions`, or
/// its position in `graph` where that has none.
pub fn load(
    graph: &Graph,
    positions: &HashMap<NodeId, usize>,
) -> Result<Loaded, fusec_ir::graph::CycleError> {
    let mut egraph = FGraph::new(TypeAnalysis::default());
    let mut class_of: HashMap<NodeId, Id> = HashMap::new();
    for (position, id) in graph.topo_order()?.into_iter().enumerate() {
        let node = graph.node(id);
        if matches!(node.op, Op::Input { .. } | Op::Weight { .. }) {
            egraph
                .analysis
                .leaf_types
                .insert(node.op.clone(), node.ty.clone());
        }
        let children = graph.operands(id).iter().map(|o| class_of[o]).collect();
        let origin = positions.get(&id).copied().unwrap_or(position);
        egraph.analysis.next_origin = (origin, node.layer);
        let class = egraph.add(ENode {
            op: node.op.clone(),
            children,
        });
        class_of.insert(id, class);
    }
    let outputs = graph
        .outputs()
        .iter()
        .map(|o| (o.name.clone(), o.kind, class_of[&o.value]))
        .collect();
    egraph.rebuild();
    Ok(Loaded { egraph, outputs })
}

/// Estimated seconds on a GPU, summed over a tree of e-nodes: each kernel costs its
/// launch overhead plus the larger of its memory and math time (`GpuSpec::kernel_seconds`),
/// with bytes and FLOPs from the same rules as the report (`fusec_ir::cost::op_cost`).
/// A fused node therefore wins exactly when it saves bytes or launches.
#[derive(Debug)]
pub struct GpuCost<'a> {
    pub egraph: &'a FGraph,
    pub gpu: &'a GpuSpec,
    pub bindings: &'a Bindings,
}

impl GpuCost<'_> {
    /// The seconds of one node on its own.
    pub fn node_seconds(&self, enode: &ENode) -> f64 {
        if !enode.op.launches_kernel() {
            return 0.0;
        }
        let types: Vec<&Type> = enode
            .children
            .iter()
            .filter_map(|&c| self.egraph[c].data.ty.as_ref())
            .collect();
        if types.len() != enode.children.len() {
            return f64::INFINITY;
        }
        let reads: Vec<u64> = enode
            .children
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let data = &self.egraph[c].data;
                let in_place = i == 0 && enode.op == Op::Fused(FusedOp::KvAppend);
                if data.scalar.is_some() || in_place {
                    0
                } else {
                    data.ty
                        .as_ref()
                        .and_then(|t| t.bytes(self.bindings).ok())
                        .unwrap_or(0)
                }
            })
            .collect();
        let Some(out) = TypeAnalysis::infer(self.egraph, enode).ok() else {
            return f64::INFINITY;
        };
        let Ok(cost) = op_cost(&enode.op, &types, &reads, &out, self.bindings) else {
            return f64::INFINITY;
        };
        let dtype = out
            .tensors()
            .first()
            .map_or(fusec_ir::DType::F32, |t| t.dtype);
        self.gpu.kernel_seconds(cost.bytes(), cost.flops, dtype)
    }
}

impl CostFunction<ENode> for GpuCost<'_> {
    type Cost = f64;

    fn cost<C>(&mut self, enode: &ENode, mut costs: C) -> f64
    where
        C: FnMut(Id) -> f64,
    {
        enode.fold(self.node_seconds(enode), |sum, id| sum + costs(id))
    }
}

/// Builds the graph of the cheapest node of every e-class the outputs need. Nodes are
/// created ready-first by eager origin, so the result reads in the eager order.
pub fn extract(
    loaded: &Loaded,
    cost: GpuCost<'_>,
    name: &str,
    attrs: BTreeMap<String, String>,
) -> Result<Graph, ExtractError> {
    let egraph = loaded.egraph_ref();
    let extractor = Extractor::new(egraph, cost);
    // The classes the outputs need, with their chosen nodes.
    let mut chosen: BTreeMap<Id, ENode> = BTreeMap::new();
    let mut stack: Vec<Id> = loaded
        .outputs
        .iter()
        .map(|(_, _, c)| egraph.find(*c))
        .collect();
    while let Some(c) = stack.pop() {
        if chosen.contains_key(&c) {
            continue;
        }
        let node = extractor.find_best_node(c).clone();
        for &child in &node.children {
            stack.push(egraph.find(child));
        }
        chosen.insert(c, node);
    }
    // Kahn's algorithm by eager origin.
    let mut waiting: BTreeMap<Id, usize> = BTreeMap::new();
    let mut users: BTreeMap<Id, Vec<Id>> = BTreeMap::new();
    let mut ready = BinaryHeap::new();
    for (&c, node) in &chosen {
        let mut deps: Vec<Id> = node.children.iter().map(|&ch| egraph.find(ch)).collect();
        deps.sort();
        deps.dedup();
        if deps.is_empty() {
            ready.push(Reverse((egraph[c].data.origin, c)));
        }
        for d in &deps {
            users.entry(*d).or_default().push(c);
        }
        waiting.insert(c, deps.len());
    }
    let mut graph = Graph::new(name);
    graph.attrs = attrs;
    let mut node_of: HashMap<Id, NodeId> = HashMap::new();
    while let Some(Reverse((_, c))) = ready.pop() {
        let node = &chosen[&c];
        let data = &egraph[c].data;
        let operands: Vec<NodeId> = node
            .children
            .iter()
            .map(|ch| node_of[&egraph.find(*ch)])
            .collect();
        let id = match &node.op {
            Op::Input { .. } | Op::Weight { .. } => {
                let ty = egraph.analysis.leaf_types[&node.op].clone();
                graph.add_typed(node.op.clone(), &[], ty)
            }
            op => graph
                .add(op.clone(), &operands)
                .map_err(ExtractError::Type)?,
        };
        let n = graph.node_mut(id);
        n.layer = data.layer;
        if let Some(p) = data.provenance.get(&node.op) {
            n.provenance = p.clone();
        }
        node_of.insert(c, id);
        for u in users.get(&c).map(Vec::as_slice).unwrap_or(&[]) {
            let w = waiting.get_mut(u).expect("every user waits");
            *w -= 1;
            if *w == 0 {
                ready.push(Reverse((egraph[*u].data.origin, *u)));
            }
        }
    }
    if node_of.len() != chosen.len() {
        return Err(ExtractError::Cycle);
    }
    for (name, kind, c) in &loaded.outputs {
        graph.add_output(name.clone(), *kind, node_of[&egraph.find(*c)]);
    }
    Ok(graph)
}

impl Loaded {
    pub fn egraph_ref(&self) -> &FGraph {
        &self.egraph
    }
}
