//! The e-class analysis: each class's type, whether it holds KV-cache state or a
//! scalar constant, where it came from in the eager graph, and the provenance of the
//! fused nodes in it.

use std::collections::{BTreeMap, HashMap};

use egg::{Analysis, DidMerge, EGraph, Id};
use fusec_ir::op::TypeError;
use fusec_ir::{Op, Provenance, Type};

use crate::lang::ENode;

/// What the analysis knows about one e-class.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassData {
    /// The type every node of the class has (`None` only transiently for a node whose
    /// operands are ill-typed, which appliers never add).
    pub ty: Option<Type>,
    /// The class holds a `state` input (a KV cache read at the start of the step).
    pub state: bool,
    /// The value of a `scalar` node in the class.
    pub scalar: Option<f64>,
    /// The smallest eager-graph position of a node in the class; orders the extracted
    /// graph and names the eager node a fused node came from.
    pub origin: usize,
    /// The decoder layer of the origin node.
    pub layer: Option<u32>,
    /// Provenance of the fused nodes in the class, by op.
    pub provenance: BTreeMap<Op, Provenance>,
}

/// The analysis. Leaf types (inputs and weights) are declared, not inferred, so the
/// analysis holds them; `next_origin` tags classes added while converting a graph.
#[derive(Debug, Default)]
pub struct TypeAnalysis {
    pub leaf_types: HashMap<Op, Type>,
    /// Origin and layer for the next node added, set by whoever adds it.
    pub next_origin: (usize, Option<u32>),
}

pub type FGraph = EGraph<ENode, TypeAnalysis>;

/// Why an e-node has no type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InferError {
    #[error("an operand has no type")]
    UntypedOperand,
    #[error(transparent)]
    Type(#[from] TypeError),
}

impl TypeAnalysis {
    /// Infers the type of `node` from its children's classes.
    pub fn infer(egraph: &FGraph, node: &ENode) -> Result<Type, InferError> {
        let mut types = Vec::with_capacity(node.children.len());
        for &c in &node.children {
            match &egraph[c].data.ty {
                Some(t) => types.push(t),
                None => return Err(InferError::UntypedOperand),
            }
        }
        let leaf = egraph.analysis.leaf_types.get(&node.op);
        Ok(node.op.infer(&types, leaf)?)
    }
}

impl Analysis<ENode> for TypeAnalysis {
    type Data = ClassData;

    fn make(egraph: &mut FGraph, enode: &ENode, _id: Id) -> Self::Data {
        let (origin, layer) = egraph.analysis.next_origin;
        ClassData {
            ty: Self::infer(egraph, enode).ok(),
            state: matches!(
                enode.op,
                Op::Input {
                    kind: fusec_ir::InputKind::State,
                    ..
                }
            ),
            scalar: match enode.op {
                Op::Scalar { value } => Some(value.0),
                _ => None,
            },
            origin,
            layer,
            provenance: BTreeMap::new(),
        }
    }

    /// Rebuilding re-derives a class's data from one of its nodes to propagate types;
    /// where the class came from is not re-derivable, so the remade data claims no
    /// origin and no provenance and the merge keeps the class's own.
    fn remake(egraph: &mut FGraph, enode: &ENode, id: Id) -> Self::Data {
        let mut data = Self::make(egraph, enode, id);
        data.origin = usize::MAX;
        data.layer = None;
        data
    }

    fn merge(&mut self, to: &mut Self::Data, from: Self::Data) -> DidMerge {
        let before = to.clone();
        if to.ty.is_none() {
            to.ty = from.ty.clone();
        }
        to.state |= from.state;
        if to.scalar.is_none() {
            to.scalar = from.scalar;
        }
        if from.origin < to.origin {
            to.origin = from.origin;
            to.layer = from.layer;
        }
        for (op, p) in from.provenance.iter() {
            merge_provenance(to.provenance.entry(op.clone()).or_default(), p);
        }
        let changed_to = *to != before;
        let from_has_less = from.ty.is_none() && before.ty.is_some();
        DidMerge(changed_to, from_has_less || changed_to)
    }
}

/// Adds `from`'s rules and covered ops to `to`, keeping each once and in order.
pub fn merge_provenance(to: &mut Provenance, from: &Provenance) {
    for r in &from.rules {
        if !to.rules.contains(r) {
            to.rules.push(r.clone());
        }
    }
    for c in &from.covers {
        if !to.covers.contains(c) {
            to.covers.push(c.clone());
        }
    }
}
