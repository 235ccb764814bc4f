//! The bound GEMV weights in compact storage, packed end to end on huge pages.

use super::executor::{is_gemv_weight_operand, Planned};
use super::value::Value;
use crate::tensor::{Buffer, Tensor};
use crate::{hugepages, pack};

/// Converts, once, every `bf16`, `f16` or FP8 E4M3 weight that only GEMVs read to
/// compact storage (2 or 1 bytes per value instead of the `f32` every other kernel
/// reads), so that decode streams the bytes the IR's dtype says. A weight that any
/// other op reads, or that is an output, stays as it is; so does one with a value its
/// dtype cannot hold exactly, which a checked load never gives. Then the GEMV weights
/// are packed on huge pages ([`pack`]), and every other bound tensor is moved onto huge
/// pages where its allocation allows ([`hugepages`]).
pub(super) fn compact_gemv_weights(plan: &mut [Planned], last_use: &[usize]) {
    let mut gemv_only = vec![true; plan.len()];
    let mut used = vec![false; plan.len()];
    for node in plan.iter() {
        for (i, &o) in node.operands.iter().enumerate() {
            used[o] = true;
            gemv_only[o] &= is_gemv_weight_operand(&node.op, i);
        }
    }
    for (s, node) in plan.iter_mut().enumerate() {
        if !used[s] || !gemv_only[s] || last_use[s] == usize::MAX {
            continue;
        }
        if let Some(Value::Tensor(t)) = &node.bound {
            if let Some(compact) = t.to_compact() {
                node.bound = Some(Value::Tensor(compact));
            }
        }
    }
    // The GEMV weights packed end to end on huge pages, in the order a step reads
    // them; every other bound tensor on huge pages where its allocation allows.
    let mut gemv_weights: Vec<&mut Tensor> = plan
        .iter_mut()
        .enumerate()
        .filter(|(s, _)| used[*s] && gemv_only[*s])
        .filter_map(|(_, node)| match &mut node.bound {
            Some(Value::Tensor(t)) => Some(t),
            _ => None,
        })
        .collect();
    pack::pack(&mut gemv_weights);
    for node in plan.iter() {
        // A packed weight's buffer was put on huge pages as it was written.
        if let Some(Value::Tensor(t)) = node.bound.as_ref().filter(|v| match v {
            Value::Tensor(t) => {
                t.storage_len() == fusec_weights::tensor::stored_len(t.dtype(), t.numel())
            }
            _ => false,
        }) {
            match t.buffer() {
                Buffer::F32(b) => hugepages::back_with_huge_pages(b),
                Buffer::I32(b) => hugepages::back_with_huge_pages(b),
                Buffer::U16(b) => hugepages::back_with_huge_pages(b),
                Buffer::U8(b) => hugepages::back_with_huge_pages(b),
            };
        }
    }
}
