//! The verifier: the invariants every graph holds after every named phase.
//!
//! - the graph is acyclic;
//! - every node's type is what its op infers from its operands (arity included);
//! - tuple-typed values are consumed only by `get`, and no output is a tuple;
//! - `dequant` values are consumed only as GEMV weights;
//! - weights, inputs and outputs have non-empty, unique names;
//! - every state input has a state output of the same name and dtype, and vice versa.
//!
//! [`verify`] reports every broken invariant it finds, in graph order, not only the
//! first: a pass that breaks several things shows them all at once.

use std::collections::{BTreeMap, HashMap};

use crate::graph::{Graph, Node, NodeId, OutputKind};
use crate::op::{InputKind, Op, OperandRole};
use crate::types::Type;

/// A broken invariant. `%N` names a value in the canonical numbering of the text form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the graph has a cycle")]
    Cycle,
    #[error("%{value} = {op}: {message}")]
    Type {
        value: usize,
        op: String,
        message: String,
    },
    #[error("%{value} = {op}: declared type {declared} differs from the inferred type {inferred}")]
    TypeMismatch {
        value: usize,
        op: String,
        declared: String,
        inferred: String,
    },
    #[error("%{value} is a tuple and is used by %{user} = {op}; only `get` reads tuples")]
    TupleUse {
        value: usize,
        user: usize,
        op: String,
    },
    #[error("weight `{0}` appears more than once")]
    DuplicateWeight(String),
    #[error("a {0} has an empty name")]
    EmptyName(&'static str),
    #[error("input `{0}` appears more than once")]
    DuplicateInput(String),
    #[error("output `{0}` appears more than once")]
    DuplicateOutput(String),
    #[error("output `{0}` is a tuple; outputs must be tensors")]
    TupleOutput(String),
    #[error("state input `{0}` has no state output of the same name")]
    StateWithoutOutput(String),
    #[error("state output `{0}` has no state input of the same name")]
    StateWithoutInput(String),
    #[error("%{value} = dequant is used by %{user} = {op} outside a GEMV weight operand")]
    DequantUse {
        value: usize,
        user: usize,
        op: String,
    },
    #[error("state `{name}` is read as {input} but written as {output}")]
    StateTypeMismatch {
        name: String,
        input: String,
        output: String,
    },
}

/// Every invariant a graph broke, in the order found: at least one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violations {
    first: VerifyError,
    rest: Vec<VerifyError>,
}

impl Violations {
    fn from_vec(mut all: Vec<VerifyError>) -> Option<Violations> {
        if all.is_empty() {
            return None;
        }
        let first = all.remove(0);
        Some(Violations { first, rest: all })
    }

    /// The first violation found.
    pub fn first(&self) -> &VerifyError {
        &self.first
    }

    /// Every violation, in the order found.
    pub fn iter(&self) -> impl Iterator<Item = &VerifyError> {
        std::iter::once(&self.first).chain(&self.rest)
    }

    /// How many violations there are (at least one).
    pub fn len(&self) -> usize {
        1 + self.rest.len()
    }

    /// Always false: a `Violations` holds at least one.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn into_vec(self) -> Vec<VerifyError> {
        let mut v = vec![self.first];
        v.extend(self.rest);
        v
    }
}

impl From<VerifyError> for Violations {
    fn from(e: VerifyError) -> Self {
        Violations {
            first: e,
            rest: Vec::new(),
        }
    }
}

/// One violation per line.
impl std::fmt::Display for Violations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Violations {}

/// Checks every invariant; returns every broken one. A cycle stops the check (nothing
/// else can be numbered).
pub fn verify(graph: &Graph) -> Result<(), Violations> {
    let order = graph.topo_order().map_err(|_| VerifyError::Cycle)?;
    let checker = Checker {
        graph,
        number: order.iter().enumerate().map(|(i, &id)| (id, i)).collect(),
    };
    let mut found = Vec::new();
    let mut weights = BTreeMap::new();
    let mut inputs = BTreeMap::new();
    for &id in &order {
        let node = graph.node(id);
        let operands = graph.operands(id);
        for check in [
            checker.node_type(id, node, &operands),
            checker.tuple_uses(id, node, &operands),
            checker.dequant_uses(id, node, &operands),
        ] {
            found.extend(check.err());
        }
        match &node.op {
            Op::Weight { name } => {
                if name.is_empty() {
                    found.push(VerifyError::EmptyName("weight"));
                } else if weights.insert(name.clone(), id).is_some() {
                    found.push(VerifyError::DuplicateWeight(name.clone()));
                }
            }
            Op::Input { name, kind } => {
                if name.is_empty() {
                    found.push(VerifyError::EmptyName("input"));
                } else if inputs.insert(name.clone(), (*kind, id)).is_some() {
                    found.push(VerifyError::DuplicateInput(name.clone()));
                }
            }
            _ => {}
        }
    }

    let mut outputs = BTreeMap::new();
    for o in graph.outputs() {
        if o.name.is_empty() {
            found.push(VerifyError::EmptyName("output"));
        } else if outputs.insert(o.name.clone(), o).is_some() {
            found.push(VerifyError::DuplicateOutput(o.name.clone()));
        }
        if matches!(graph.ty(o.value), Type::Tuple(_)) {
            found.push(VerifyError::TupleOutput(o.name.clone()));
        }
    }
    for (name, (kind, id)) in &inputs {
        if *kind != InputKind::State {
            continue;
        }
        let Some(out) = outputs.get(name).filter(|o| o.kind == OutputKind::State) else {
            found.push(VerifyError::StateWithoutOutput(name.clone()));
            continue;
        };
        let (tin, tout) = (graph.ty(*id), graph.ty(out.value));
        let same_kind = match (tin, tout) {
            (Type::Tensor(a), Type::Tensor(b)) => a.dtype == b.dtype && a.rank() == b.rank(),
            _ => false,
        };
        if !same_kind {
            found.push(VerifyError::StateTypeMismatch {
                name: name.clone(),
                input: tin.to_string(),
                output: tout.to_string(),
            });
        }
    }
    for (name, o) in &outputs {
        if o.kind == OutputKind::State && !matches!(inputs.get(name), Some((InputKind::State, _))) {
            found.push(VerifyError::StateWithoutInput(name.clone()));
        }
    }
    match Violations::from_vec(found) {
        Some(v) => Err(v),
        None => Ok(()),
    }
}

/// The per-node checks, over the canonical numbering of the text form.
struct Checker<'a> {
    graph: &'a Graph,
    number: HashMap<NodeId, usize>,
}

impl Checker<'_> {
    /// The node's type is what its op infers from its operands (arity included).
    fn node_type(&self, id: NodeId, node: &Node, operands: &[NodeId]) -> Result<(), VerifyError> {
        let (graph, number) = (self.graph, &self.number);
        let types: Vec<&Type> = operands.iter().map(|&o| graph.ty(o)).collect();
        let inferred = node
            .op
            .infer(&types, Some(&node.ty))
            .map_err(|e| VerifyError::Type {
                value: number[&id],
                op: node.op.name().to_string(),
                message: e.message,
            })?;
        if inferred != node.ty {
            return Err(VerifyError::TypeMismatch {
                value: number[&id],
                op: node.op.name().to_string(),
                declared: node.ty.to_string(),
                inferred: inferred.to_string(),
            });
        }
        Ok(())
    }

    /// Tuple-typed values are consumed only by `get`.
    fn tuple_uses(&self, id: NodeId, node: &Node, operands: &[NodeId]) -> Result<(), VerifyError> {
        let (graph, number) = (self.graph, &self.number);
        if !matches!(node.op, Op::Get { .. }) {
            for &o in operands {
                if matches!(graph.ty(o), Type::Tuple(_)) {
                    return Err(VerifyError::TupleUse {
                        value: number[&o],
                        user: number[&id],
                        op: node.op.name().to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// `dequant` values are consumed only as GEMV weights.
    fn dequant_uses(
        &self,
        id: NodeId,
        node: &Node,
        operands: &[NodeId],
    ) -> Result<(), VerifyError> {
        let (graph, number) = (self.graph, &self.number);
        for (i, &o) in operands.iter().enumerate() {
            if matches!(graph.op(o), Op::Dequant { .. })
                && node.op.operand_role(i) != Some(OperandRole::GemvWeight)
            {
                return Err(VerifyError::DequantUse {
                    value: number[&o],
                    user: number[&id],
                    op: node.op.name().to_string(),
                });
            }
        }
        Ok(())
    }
}
