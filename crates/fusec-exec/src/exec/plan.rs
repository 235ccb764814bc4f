//! Planning: [`Executor::new`] turns a verified graph into the plan a step walks.

use std::collections::HashMap;
use std::sync::Arc;

use fusec_ir::shape::{Bindings, Shape};
use fusec_ir::{verify, Graph, NodeId, Op, OutputKind};
use fusec_weights::Weights;

use super::executor::{in_place_operands, node_error, Executor, Planned};
use super::packing::compact_gemv_weights;
use super::value::Value;
use crate::error::Error;
use crate::kernels::constant;
use crate::rounding;
use crate::tensor::{Dims, Tensor};

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
                if !rounding::is_supported(t.dtype) {
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
                let t = Tensor::from_weight(weights.bind(name, ty)?)
                    .map_err(|e| Error::InvalidGraph(format!("weight `{name}`: {e}")))?;
                planned.bound = Some(Value::Tensor(t));
            } else if let Op::RopeInvFreq { theta, head_dim } = &node.op {
                let t = constant::rope_inv_freq(theta.0, *head_dim)
                    .map_err(|e| node_error(&planned, e))?;
                planned.bound = Some(Value::Tensor(t));
            } else if let Op::RopeInvFreqLlama3 {
                theta,
                head_dim,
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } = &node.op
            {
                let scaling = fusec_ir::rope::Llama3Scaling {
                    factor: factor.0,
                    low_freq_factor: low_freq_factor.0,
                    high_freq_factor: high_freq_factor.0,
                    original_max_position_embeddings: *original_max_position_embeddings,
                };
                let t = constant::rope_inv_freq_llama3(theta.0, *head_dim, &scaling)
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
            check_finite: false,
        })
    }
}
