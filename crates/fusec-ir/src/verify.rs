//! The verifier: the invariants every graph holds after every named phase.
//!
//! - the graph is acyclic;
//! - every node's type is what its op infers from its operands (arity included);
//! - tuple-typed values are consumed only by `get`, and no output is a tuple;
//! - `dequant` values are consumed only as GEMV weights;
//! - weights, inputs and outputs have non-empty, unique names;
//! - every state input has a state output of the same name and dtype, and vice versa.

use std::collections::{BTreeMap, HashMap};

use crate::graph::{Graph, NodeId, OutputKind};
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

/// Checks every invariant; returns the first broken one.
pub fn verify(graph: &Graph) -> Result<(), VerifyError> {
    let order = graph.topo_order().map_err(|_| VerifyError::Cycle)?;
    let number: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &id)| (id, i)).collect();

    let mut weights = BTreeMap::new();
    let mut inputs = BTreeMap::new();
    for &id in &order {
        let node = graph.node(id);
        let operands = graph.operands(id);
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
        if !matches!(node.op, Op::Get { .. }) {
            for &o in &operands {
                if matches!(graph.ty(o), Type::Tuple(_)) {
                    return Err(VerifyError::TupleUse {
                        value: number[&o],
                        user: number[&id],
                        op: node.op.name().to_string(),
                    });
                }
            }
        }
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
        match &node.op {
            Op::Weight { name } => {
                if name.is_empty() {
                    return Err(VerifyError::EmptyName("weight"));
                }
                if weights.insert(name.clone(), id).is_some() {
                    return Err(VerifyError::DuplicateWeight(name.clone()));
                }
            }
            Op::Input { name, kind } => {
                if name.is_empty() {
                    return Err(VerifyError::EmptyName("input"));
                }
                if inputs.insert(name.clone(), (*kind, id)).is_some() {
                    return Err(VerifyError::DuplicateInput(name.clone()));
                }
            }
            _ => {}
        }
    }

    let mut outputs = BTreeMap::new();
    for o in graph.outputs() {
        if o.name.is_empty() {
            return Err(VerifyError::EmptyName("output"));
        }
        if outputs.insert(o.name.clone(), o).is_some() {
            return Err(VerifyError::DuplicateOutput(o.name.clone()));
        }
        if matches!(graph.ty(o.value), Type::Tuple(_)) {
            return Err(VerifyError::TupleOutput(o.name.clone()));
        }
    }
    for (name, (kind, id)) in &inputs {
        if *kind != InputKind::State {
            continue;
        }
        let Some(out) = outputs.get(name).filter(|o| o.kind == OutputKind::State) else {
            return Err(VerifyError::StateWithoutOutput(name.clone()));
        };
        let (tin, tout) = (graph.ty(*id), graph.ty(out.value));
        let same_kind = match (tin, tout) {
            (Type::Tensor(a), Type::Tensor(b)) => a.dtype == b.dtype && a.rank() == b.rank(),
            _ => false,
        };
        if !same_kind {
            return Err(VerifyError::StateTypeMismatch {
                name: name.clone(),
                input: tin.to_string(),
                output: tout.to_string(),
            });
        }
    }
    for (name, o) in &outputs {
        if o.kind == OutputKind::State && !matches!(inputs.get(name), Some((InputKind::State, _))) {
            return Err(VerifyError::StateWithoutInput(name.clone()));
        }
    }
    Ok(())
}
