//! Fusion segment by segment: the per-step prologue, each decoder layer, and the
//! epilogue are fused separately and stitched back together.
//!
//! Two reasons. Equality saturation and extraction then grow linearly with the number
//! of layers, and layers that are identical up to weight and cache names (all of them,
//! in a Llama) are fused once and reused by renaming. And egg's tree-cost extraction
//! counts a shared value once per path to it: along a residual stream the number of
//! paths grows geometrically with depth, so over a whole model the costs would swamp
//! the per-kernel differences extraction has to compare. Within one layer they stay
//! small. No rule crosses a layer boundary, so nothing is lost.

use std::collections::{BTreeMap, HashMap};

use fusec_ir::graph::{CycleError, Provenance};
use fusec_ir::{Graph, InputKind, NodeId, Op, OutputKind};

/// Why splitting or stitching failed: an invariant of the segments broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    #[error(transparent)]
    Cycle(#[from] CycleError),
    #[error("bad segment input `{0}`")]
    BadInput(String),
    #[error("segment input `{0}` has no producer")]
    NoProducer(String),
    #[error("bad segment output `{0}`")]
    BadOutput(String),
    #[error("segment output `{0}` out of range")]
    OutputOutOfRange(String),
}

/// Which segment a node belongs to.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SegmentKey {
    Prologue,
    Layer(u32),
    Epilogue,
}

/// One segment as a stand-alone graph.
#[derive(Debug)]
pub struct Segment {
    pub key: SegmentKey,
    pub graph: Graph,
    /// The eager position (`%N`) of each of the segment graph's nodes, by node id.
    pub positions: HashMap<NodeId, usize>,
    /// Segment input `ext{k}` is the eager value at this position.
    pub inputs: Vec<usize>,
    /// Segment output `out{k}` is the eager value at this position (graph outputs keep
    /// their own names and are not listed here).
    pub outputs: Vec<usize>,
}

/// Splits a graph into segments, in order.
pub fn split(graph: &Graph) -> Result<Vec<Segment>, SegmentError> {
    let order = graph.topo_order()?;
    let position: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let first_layer = order.iter().position(|&n| graph.node(n).layer.is_some());
    // A step input outside any layer belongs to the prologue wherever it was declared:
    // a sliding window's mask is declared by the first layer that reads it.
    let key_of = |n: NodeId| match graph.node(n).layer {
        Some(l) => SegmentKey::Layer(l),
        None if matches!(graph.op(n), Op::Input { .. }) => SegmentKey::Prologue,
        None if first_layer.is_some_and(|f| position[&n] > f) => SegmentKey::Epilogue,
        None => SegmentKey::Prologue,
    };
    let mut members: BTreeMap<SegmentKey, Vec<NodeId>> = BTreeMap::new();
    for &n in &order {
        members.entry(key_of(n)).or_default().push(n);
    }
    // Values each segment must export: used by another segment, or a graph output.
    let mut exported: BTreeMap<SegmentKey, Vec<NodeId>> = BTreeMap::new();
    for &n in &order {
        let used_outside = graph.users(n).into_iter().any(|u| key_of(u) != key_of(n));
        if used_outside {
            exported.entry(key_of(n)).or_default().push(n);
        }
    }
    let mut segments = Vec::new();
    for (key, nodes) in members {
        let mut g = Graph::new(graph.name.clone());
        g.attrs = graph.attrs.clone();
        let mut map: HashMap<NodeId, NodeId> = HashMap::new();
        let mut positions = HashMap::new();
        let mut inputs = Vec::new();
        for &n in &nodes {
            let mut operands = Vec::new();
            for o in graph.operands(n) {
                if let Some(&m) = map.get(&o) {
                    operands.push(m);
                    continue;
                }
                // A value from another segment enters as an input.
                let name = format!("segment.ext{}", inputs.len());
                let ty = graph.ty(o).clone();
                let id = g.add_typed(
                    Op::Input {
                        name,
                        kind: InputKind::Data,
                    },
                    &[],
                    ty,
                );
                positions.insert(id, position[&o]);
                inputs.push(position[&o]);
                map.insert(o, id);
                operands.push(id);
            }
            let node = graph.node(n);
            let id = g.add_typed(node.op.clone(), &operands, node.ty.clone());
            g.node_mut(id).layer = node.layer;
            g.node_mut(id).provenance = node.provenance.clone();
            positions.insert(id, position[&n]);
            map.insert(n, id);
        }
        let mut outputs = Vec::new();
        for &n in exported.get(&key).map(Vec::as_slice).unwrap_or(&[]) {
            g.add_output(
                format!("segment.out{}", outputs.len()),
                OutputKind::Data,
                map[&n],
            );
            outputs.push(position[&n]);
        }
        for o in graph.outputs() {
            if let Some(&m) = map.get(&o.value) {
                g.add_output(o.name.clone(), o.kind, m);
            }
        }
        segments.push(Segment {
            key,
            graph: g,
            positions,
            inputs,
            outputs,
        });
    }
    Ok(segments)
}

/// Renames weights, state inputs and state outputs of `graph` through `names`.
pub fn rename(graph: &Graph, names: &HashMap<String, String>) -> Graph {
    let mut g = graph.clone();
    let ids: Vec<NodeId> = g.node_ids().collect();
    for id in ids {
        match &mut g.node_mut(id).op {
            Op::Weight { name } => {
                if let Some(n) = names.get(name) {
                    *name = n.clone();
                }
            }
            Op::Input {
                name,
                kind: InputKind::State,
            } => {
                if let Some(n) = names.get(name) {
                    *name = n.clone();
                }
            }
            _ => {}
        }
    }
    g.rename_outputs(|n| names.get(n).cloned());
    g
}

/// Weight and state names of `graph` in canonical order.
pub fn names(graph: &Graph) -> Vec<String> {
    let mut out = Vec::new();
    for id in graph.topo_order().unwrap_or_default() {
        match graph.op(id) {
            Op::Weight { name }
            | Op::Input {
                name,
                kind: InputKind::State,
            } => out.push(name.clone()),
            _ => {}
        }
    }
    out
}

/// The segment with names abstracted, printed: equal keys mean segments identical up
/// to weight and state names.
pub fn shape_key(graph: &Graph) -> Result<String, SegmentError> {
    let map: HashMap<String, String> = names(graph)
        .into_iter()
        .enumerate()
        .map(|(i, n)| (n, format!("name{i}")))
        .collect();
    let mut g = rename(graph, &map);
    // Eager positions differ between layers; provenance is absent from eager graphs.
    for id in g.node_ids().collect::<Vec<_>>() {
        g.node_mut(id).provenance = Provenance::default();
        g.node_mut(id).layer = None;
    }
    Ok(fusec_ir::text::print(&g)?)
}

/// Rewrites the `%N` eager positions in provenance through `map`.
pub fn remap_provenance(p: &Provenance, map: &HashMap<usize, usize>) -> Provenance {
    let covers = p
        .covers
        .iter()
        .map(|c| {
            let (num, rest) = c.trim_start_matches('%').split_once(' ').unwrap_or((c, ""));
            match num.parse::<usize>().ok().and_then(|n| map.get(&n)) {
                Some(m) => format!("%{m} {rest}"),
                None => c.clone(),
            }
        })
        .collect();
    Provenance {
        rules: p.rules.clone(),
        covers,
    }
}

/// A fused template segment reused for another segment of the same shape: names and
/// eager positions are mapped node for node. Returns the graph and the position map.
pub fn reuse(
    template: &Graph,
    template_eager: &Graph,
    template_positions: &HashMap<NodeId, usize>,
    seg: &Segment,
) -> (Graph, HashMap<usize, usize>) {
    let names: HashMap<String, String> = names(template_eager)
        .into_iter()
        .zip(names(&seg.graph))
        .collect();
    let mut fused = rename(template, &names);
    let positions: HashMap<usize, usize> = template_eager
        .topo_order()
        .unwrap_or_default()
        .into_iter()
        .zip(seg.graph.topo_order().unwrap_or_default())
        .filter_map(|(t, s)| Some((*template_positions.get(&t)?, *seg.positions.get(&s)?)))
        .collect();
    let layer = match seg.key {
        SegmentKey::Layer(l) => Some(l),
        _ => None,
    };
    for id in fused.node_ids().collect::<Vec<_>>() {
        let node = fused.node_mut(id);
        node.provenance = remap_provenance(&node.provenance, &positions);
        if node.layer.is_some() {
            node.layer = layer;
        }
    }
    (fused, positions)
}

/// Near misses of a template, at the positions of the segment reusing it.
pub fn remap_misses(
    misses: &[crate::rule::NearMiss],
    positions: &HashMap<usize, usize>,
) -> Vec<crate::rule::NearMiss> {
    misses
        .iter()
        .map(|m| crate::rule::NearMiss {
            at: positions.get(&m.at).copied().unwrap_or(m.at),
            ..m.clone()
        })
        .collect()
}

/// Puts fused segments back together into one graph.
#[derive(Debug)]
pub struct Stitcher {
    graph: Graph,
    /// The stitched node holding the value of each eager position exported so far.
    value_at: HashMap<usize, NodeId>,
    outputs: HashMap<String, (OutputKind, NodeId)>,
    output_order: Vec<String>,
}

impl Stitcher {
    pub fn new(eager: &Graph) -> Self {
        let mut graph = Graph::new(eager.name.clone());
        graph.inherit_weight_roles(eager);
        graph.attrs = eager.attrs.clone();
        // The fused graph keeps the eager graph's weights, and so their roles.
        graph.inherit_weight_roles(eager);
        Self {
            graph,
            value_at: HashMap::new(),
            outputs: HashMap::new(),
            output_order: eager.outputs().iter().map(|o| o.name.clone()).collect(),
        }
    }

    /// Appends a fused segment, wiring its inputs to earlier segments' outputs.
    pub fn add(&mut self, seg: &Segment, fused: &Graph) -> Result<(), SegmentError> {
        let mut map: HashMap<NodeId, NodeId> = HashMap::new();
        for id in fused.topo_order()? {
            let node = fused.node(id);
            if let Op::Input { name, .. } = &node.op {
                if let Some(k) = name.strip_prefix("segment.ext") {
                    let k: usize = k
                        .parse()
                        .map_err(|_| SegmentError::BadInput(name.clone()))?;
                    let value = seg
                        .inputs
                        .get(k)
                        .and_then(|p| self.value_at.get(p))
                        .ok_or_else(|| SegmentError::NoProducer(name.clone()))?;
                    map.insert(id, *value);
                    continue;
                }
            }
            let operands: Vec<NodeId> = fused.operands(id).iter().map(|o| map[o]).collect();
            let new = self
                .graph
                .add_typed(node.op.clone(), &operands, node.ty.clone());
            let n = self.graph.node_mut(new);
            n.layer = node.layer;
            n.provenance = node.provenance.clone();
            map.insert(id, new);
        }
        for o in fused.outputs() {
            let value = map[&o.value];
            match o.name.strip_prefix("segment.out") {
                Some(k) => {
                    let k: usize = k
                        .parse()
                        .map_err(|_| SegmentError::BadOutput(o.name.clone()))?;
                    let position = seg
                        .outputs
                        .get(k)
                        .ok_or_else(|| SegmentError::OutputOutOfRange(o.name.clone()))?;
                    self.value_at.insert(*position, value);
                }
                None => {
                    self.outputs.insert(o.name.clone(), (o.kind, value));
                }
            }
        }
        Ok(())
    }

    /// The stitched graph, with the eager graph's outputs in their order.
    pub fn finish(mut self) -> Graph {
        for name in &self.output_order {
            if let Some((kind, value)) = self.outputs.get(name) {
                self.graph.add_output(name.clone(), *kind, *value);
            }
        }
        self.graph
    }
}
