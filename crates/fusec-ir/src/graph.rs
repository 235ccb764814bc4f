//! The tensor graph: nodes are ops with their result types, edges carry operands.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::{EdgeRef, NodeIndexable};
use petgraph::Direction;

use crate::op::{InputKind, Op, TypeError};
use crate::role::WeightRole;
use crate::types::{TensorType, Type};

/// A node of a [`Graph`]. Ids are stable across removals of other nodes.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub(crate) NodeIndex<u32>);

impl NodeId {
    /// The raw index, stable for the life of the graph (not the `%N` of the text form).
    pub fn index(self) -> usize {
        self.0.index()
    }
}

/// Where a fused node came from: the rules that built it and the ops it replaced.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Provenance {
    /// Names of the rewrite rules that produced the node, in order of application.
    pub rules: Vec<String>,
    /// The eager ops the node covers, as `op.name` counts, e.g. `binary.mul x2`.
    pub covers: Vec<String>,
}

impl Provenance {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.covers.is_empty()
    }
}

/// An op with its result type.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub ty: Type,
    /// The decoder layer the node belongs to, if any (for per-layer reports).
    pub layer: Option<u32>,
    pub provenance: Provenance,
}

impl Node {
    /// The tensor type; panics on a tuple-typed node, which only `get` may consume and
    /// which the verifier rejects elsewhere.
    pub fn tensor_type(&self) -> Option<&TensorType> {
        self.ty.tensor()
    }
}

/// Whether a graph output is a plain result or the next value of a state input.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum OutputKind {
    Data,
    State,
}

/// A named result of the graph.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    pub name: String,
    pub kind: OutputKind,
    pub value: NodeId,
}

/// A graph contains a cycle through the given node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the graph has a cycle")]
pub struct CycleError(pub NodeId);

/// A typed tensor graph for one decode step.
///
/// Edge weights are operand positions; [`Graph::operands`] returns operands in order.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    /// Free-form graph attributes printed on the `graph` line (`layers=32`).
    pub attrs: BTreeMap<String, String>,
    g: StableDiGraph<Node, u32>,
    outputs: Vec<Output>,
    /// What each weight is, by weight name, as its builder recorded it (see
    /// [`crate::role`]); not part of the text form.
    weight_roles: BTreeMap<String, WeightRole>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// Adds a node whose type is inferred from its operands.
    pub fn add(&mut self, op: Op, operands: &[NodeId]) -> Result<NodeId, TypeError> {
        let types: Vec<&Type> = operands.iter().map(|&id| &self.g[id.0].ty).collect();
        let ty = op.infer(&types, None)?;
        Ok(self.add_typed(op, operands, ty))
    }

    /// Adds an `input`, `state` or `weight` leaf of the given type.
    pub fn add_leaf(&mut self, op: Op, ty: TensorType) -> Result<NodeId, TypeError> {
        let ty = op.infer(&[], Some(&Type::Tensor(ty)))?;
        Ok(self.add_typed(op, &[], ty))
    }

    /// Adds a node with a given type, unchecked (the parser uses this; the verifier checks
    /// the type afterwards).
    pub fn add_typed(&mut self, op: Op, operands: &[NodeId], ty: Type) -> NodeId {
        let id = NodeId(self.g.add_node(Node {
            op,
            ty,
            layer: None,
            provenance: Provenance::default(),
        }));
        for (port, operand) in operands.iter().enumerate() {
            self.g.add_edge(operand.0, id.0, port as u32);
        }
        id
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id.0]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.g[id.0]
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.g.contains_node(id.0)
    }

    pub fn op(&self, id: NodeId) -> &Op {
        &self.g[id.0].op
    }

    pub fn ty(&self, id: NodeId) -> &Type {
        &self.g[id.0].ty
    }

    /// The operands of a node, in order.
    pub fn operands(&self, id: NodeId) -> Vec<NodeId> {
        let mut edges: Vec<(u32, NodeId)> = self
            .g
            .edges_directed(id.0, Direction::Incoming)
            .map(|e| (*e.weight(), NodeId(e.source())))
            .collect();
        edges.sort_unstable();
        edges.into_iter().map(|(_, n)| n).collect()
    }

    /// The nodes that use `id` as an operand (each once), in id order.
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut users: Vec<NodeId> = self
            .g
            .neighbors_directed(id.0, Direction::Outgoing)
            .map(NodeId)
            .collect();
        users.sort_unstable();
        users.dedup();
        users
    }

    pub fn node_count(&self) -> usize {
        self.g.node_count()
    }

    /// All node ids in insertion order.
    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.g.node_indices().map(NodeId)
    }

    pub fn outputs(&self) -> &[Output] {
        &self.outputs
    }

    pub fn add_output(&mut self, name: impl Into<String>, kind: OutputKind, value: NodeId) {
        self.outputs.push(Output {
            name: name.into(),
            kind,
            value,
        });
    }

    /// Renames outputs for which `f` gives a new name.
    pub fn rename_outputs(&mut self, f: impl Fn(&str) -> Option<String>) {
        for o in &mut self.outputs {
            if let Some(n) = f(&o.name) {
                o.name = n;
            }
        }
    }

    /// The output called `name`.
    pub fn output(&self, name: &str) -> Option<&Output> {
        self.outputs.iter().find(|o| o.name == name)
    }

    /// Leaves of kind `input` or `state`, in insertion order, with their names.
    pub fn inputs(&self) -> Vec<(NodeId, &str, InputKind)> {
        self.node_ids()
            .filter_map(|id| match &self.g[id.0].op {
                Op::Input { name, kind } => Some((id, name.as_str(), *kind)),
                _ => None,
            })
            .collect()
    }

    /// The input or state leaf called `name`.
    pub fn input(&self, name: &str) -> Option<NodeId> {
        self.inputs()
            .into_iter()
            .find(|(_, n, _)| *n == name)
            .map(|(id, _, _)| id)
    }

    /// Records what the weight called `name` is.
    pub fn set_weight_role(&mut self, name: impl Into<String>, role: WeightRole) {
        self.weight_roles.insert(name.into(), role);
    }

    /// The role recorded for the weight called `name`.
    pub fn weight_role(&self, name: &str) -> Option<WeightRole> {
        self.weight_roles.get(name).copied()
    }

    /// Every recorded weight role, by weight name.
    pub fn weight_roles(&self) -> &BTreeMap<String, WeightRole> {
        &self.weight_roles
    }

    /// Copies `other`'s weight roles into this graph (a graph derived from another
    /// keeps the roles of the weights they share).
    pub fn inherit_weight_roles(&mut self, other: &Graph) {
        for (name, role) in &other.weight_roles {
            self.weight_roles.insert(name.clone(), *role);
        }
    }

    /// Weight leaves, in insertion order, with their names.
    pub fn weights(&self) -> Vec<(NodeId, &str)> {
        self.node_ids()
            .filter_map(|id| match &self.g[id.0].op {
                Op::Weight { name } => Some((id, name.as_str())),
                _ => None,
            })
            .collect()
    }

    /// Nodes in a canonical topological order: Kahn's algorithm that always takes the
    /// ready node with the smallest id. A graph whose ids are already topological (every
    /// graph built front to back, and every parsed graph) comes back in id order, which
    /// is what makes the text form a fixed point of parse-then-print.
    pub fn topo_order(&self) -> Result<Vec<NodeId>, CycleError> {
        let mut indegree: BTreeMap<NodeIndex<u32>, usize> = BTreeMap::new();
        let mut ready = BinaryHeap::new();
        for n in self.g.node_indices() {
            let d = self.g.edges_directed(n, Direction::Incoming).count();
            if d == 0 {
                ready.push(Reverse(n));
            } else {
                indegree.insert(n, d);
            }
        }
        let mut order = Vec::with_capacity(self.g.node_count());
        while let Some(Reverse(n)) = ready.pop() {
            order.push(NodeId(n));
            for e in self.g.edges_directed(n, Direction::Outgoing) {
                let t = e.target();
                let d = indegree.get_mut(&t).expect("every target has an in-degree");
                *d -= 1;
                if *d == 0 {
                    indegree.remove(&t);
                    ready.push(Reverse(t));
                }
            }
        }
        match indegree.keys().next() {
            Some(&n) => Err(CycleError(NodeId(n))),
            None => Ok(order),
        }
    }

    /// Makes operand `port` of `node` be `value`.
    pub fn set_operand(&mut self, node: NodeId, port: usize, value: NodeId) {
        let edge = self
            .g
            .edges_directed(node.0, Direction::Incoming)
            .find(|e| *e.weight() as usize == port)
            .map(|e| e.id());
        if let Some(e) = edge {
            self.g.remove_edge(e);
        }
        self.g.add_edge(value.0, node.0, port as u32);
    }

    /// Appends `value` to the operands of `node`.
    pub fn push_operand(&mut self, node: NodeId, value: NodeId) {
        let port = self.g.edges_directed(node.0, Direction::Incoming).count();
        self.g.add_edge(value.0, node.0, port as u32);
    }

    /// Re-derives every non-leaf node's type from its operands, in order, after a pass
    /// changed leaf types or operands.
    pub fn reinfer_types(&mut self) -> Result<(), TypeError> {
        let order = self.topo_order().map_err(|_| TypeError {
            op: "graph".into(),
            message: "the graph has a cycle".into(),
        })?;
        for id in order {
            if self.node(id).op.is_leaf()
                && !matches!(
                    self.node(id).op,
                    Op::Scalar { .. } | Op::RopeInvFreq { .. } | Op::RopeInvFreqLlama3 { .. }
                )
            {
                continue;
            }
            let operands = self.operands(id);
            let types: Vec<&Type> = operands.iter().map(|&o| &self.g[o.0].ty).collect();
            let ty = self.g[id.0].op.infer(&types, None)?;
            self.g[id.0].ty = ty;
        }
        Ok(())
    }

    /// Makes every use of `old` (as an operand or output) a use of `new`.
    pub fn replace_all_uses(&mut self, old: NodeId, new: NodeId) {
        let uses: Vec<(NodeIndex<u32>, u32)> = self
            .g
            .edges_directed(old.0, Direction::Outgoing)
            .map(|e| (e.target(), *e.weight()))
            .collect();
        for (target, port) in uses {
            if let Some(e) = self.g.find_edge(old.0, target) {
                self.g.remove_edge(e);
            }
            self.g.add_edge(new.0, target, port);
        }
        for o in &mut self.outputs {
            if o.value == old {
                o.value = new;
            }
        }
    }

    /// Removes nodes that no output depends on; returns how many.
    pub fn remove_dead(&mut self) -> usize {
        let mut live = vec![false; self.g.node_bound()];
        let mut stack: Vec<NodeIndex<u32>> = self.outputs.iter().map(|o| o.value.0).collect();
        while let Some(n) = stack.pop() {
            if std::mem::replace(&mut live[n.index()], true) {
                continue;
            }
            stack.extend(self.g.neighbors_directed(n, Direction::Incoming));
        }
        let dead: Vec<NodeIndex<u32>> =
            self.g.node_indices().filter(|n| !live[n.index()]).collect();
        for &n in &dead {
            self.g.remove_node(n);
        }
        dead.len()
    }

    /// A copy holding only the nodes the outputs need, created in use order: a
    /// post-order walk from the outputs in order, operands in order, so every value is
    /// defined just before its first use. Passes that add nodes call this to keep the
    /// text form readable.
    pub fn reordered(&self) -> Graph {
        let mut out = Graph::new(self.name.clone());
        out.attrs = self.attrs.clone();
        out.weight_roles = self.weight_roles.clone();
        let mut new_id: std::collections::HashMap<NodeId, NodeId> =
            std::collections::HashMap::new();
        // (node, whether its operands are done); iterative, as graphs are deep.
        let mut stack: Vec<(NodeId, bool)> = self
            .outputs
            .iter()
            .rev()
            .map(|o| (o.value, false))
            .collect();
        while let Some((id, expanded)) = stack.pop() {
            if new_id.contains_key(&id) {
                continue;
            }
            let operands = self.operands(id);
            if expanded {
                let mapped: Vec<NodeId> = operands.iter().map(|o| new_id[o]).collect();
                let node = self.node(id);
                let n = out.add_typed(node.op.clone(), &mapped, node.ty.clone());
                let copy = out.node_mut(n);
                copy.layer = node.layer;
                copy.provenance = node.provenance.clone();
                new_id.insert(id, n);
            } else {
                stack.push((id, true));
                for &o in operands.iter().rev() {
                    if !new_id.contains_key(&o) {
                        stack.push((o, false));
                    }
                }
            }
        }
        for o in &self.outputs {
            out.add_output(o.name.clone(), o.kind, new_id[&o.value]);
        }
        // The weights kept keep their roles.
        let roles: Vec<(String, WeightRole)> = out
            .weights()
            .into_iter()
            .filter_map(|(_, name)| Some((name.to_string(), self.weight_role(name)?)))
            .collect();
        for (name, role) in roles {
            out.set_weight_role(name, role);
        }
        out
    }

    /// The number of decoder layers, from the `layers` attribute (0 when absent).
    pub fn layers(&self) -> u32 {
        self.attrs
            .get("layers")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}
