//! Graph passes after extraction. They fuse what single-rooted rewrite rules cannot
//! express, because the result has several values:
//!
//! - `absorb-kv-append`: attention whose query and key carry RoPE and whose caches are
//!   appended in place becomes one `fused.decode_attention` that returns the output
//!   and both updated caches. The KV write is a side effect of the kernel, so it is
//!   done here, in a pass over the ordered graph, not by a rule in the e-graph.
//! - `absorb-paged-rope`: paged attention whose query and key carry RoPE (with the
//!   same tables) becomes one `fused.paged_decode_attention`, as `absorb-kv-append`
//!   folds RoPE into dense decode attention.
//! - `merge-gemv`: GEMVs with the same normalised input (`q`, `k`, `v`) become one
//!   kernel with several weights and a tuple result; so do plain GEMVs with the same
//!   input (`fused.multi_linear`).

use std::collections::BTreeMap;

use fusec_ir::graph::Provenance;
use fusec_ir::op::TypeError;
use fusec_ir::{FusedOp, Graph, NodeId, Op};

use crate::analysis::merge_provenance;

/// A node a pass builds does not type-check: a pass's invariant broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PassError {
    /// The fused node.
    #[error("{pass}: {source}")]
    Fused {
        pass: &'static str,
        #[source]
        source: TypeError,
    },
    /// A `get` of its tuple result.
    #[error(transparent)]
    Get(TypeError),
}

fn is(graph: &Graph, id: NodeId, f: FusedOp) -> bool {
    graph.op(id) == &Op::Fused(f)
}

fn merged(graph: &Graph, nodes: &[NodeId], pass: &str) -> Provenance {
    let mut p = Provenance::default();
    for &n in nodes {
        merge_provenance(&mut p, &graph.node(n).provenance);
    }
    p.rules.push(pass.to_string());
    p
}

/// Replaces `node` by a tuple-typed `fused` node, each old value by a `get`.
fn replace_with_tuple(graph: &mut Graph, fused: NodeId, old: &[NodeId]) -> Result<(), PassError> {
    for (index, &o) in old.iter().enumerate() {
        let get = graph
            .add(Op::Get { index }, &[fused])
            .map_err(PassError::Get)?;
        graph.node_mut(get).layer = graph.node(fused).layer;
        graph.replace_all_uses(o, get);
    }
    Ok(())
}

/// `absorb-kv-append`; returns how many attentions it fused.
pub fn absorb_kv_append(graph: &mut Graph) -> Result<usize, PassError> {
    let attentions: Vec<NodeId> = graph
        .node_ids()
        .filter(|&n| is(graph, n, FusedOp::Attention))
        .collect();
    let mut fused = 0;
    for att in attentions {
        let ops = graph.operands(att);
        // A soft-capped attention (Gemma 2's, a sixth operand) becomes the soft-capped
        // decode kernel.
        let (q, k_all, v_all, scale, mask) = (ops[0], ops[1], ops[2], ops[3], ops[4]);
        let softcap = ops.get(5).copied();
        if !(is(graph, q, FusedOp::Rope)
            && is(graph, k_all, FusedOp::KvAppend)
            && is(graph, v_all, FusedOp::KvAppend))
        {
            continue;
        }
        let q_ops = graph.operands(q);
        let (pk, k_rot) = {
            let o = graph.operands(k_all);
            (o[0], o[1])
        };
        let (pv, v) = {
            let o = graph.operands(v_all);
            (o[0], o[1])
        };
        if !is(graph, k_rot, FusedOp::Rope) {
            continue;
        }
        let k_ops = graph.operands(k_rot);
        // The same tables rotate q and k.
        if q_ops[1..] != k_ops[1..] {
            continue;
        }
        // The appended caches must feed only this attention and the state outputs.
        let only_here = |n: NodeId| graph.users(n).iter().all(|&u| u == att);
        if !only_here(k_all) || !only_here(v_all) {
            continue;
        }
        let mut operands = vec![
            q_ops[0], k_ops[0], v, q_ops[1], q_ops[2], pk, pv, scale, mask,
        ];
        let kind = match softcap {
            None => FusedOp::DecodeAttention,
            Some(c) => {
                operands.push(c);
                FusedOp::DecodeAttentionCapped
            }
        };
        let new = graph
            .add(Op::Fused(kind), &operands)
            .map_err(|source| PassError::Fused {
                pass: "absorb-kv-append",
                source,
            })?;
        let provenance = merged(graph, &[att, q, k_rot, k_all, v_all], "absorb-kv-append");
        let layer = graph.node(att).layer;
        let node = graph.node_mut(new);
        node.provenance = provenance;
        node.layer = layer;
        replace_with_tuple(graph, new, &[att, k_all, v_all])?;
        fused += 1;
    }
    graph.remove_dead();
    Ok(fused)
}

/// `absorb-paged-rope`; returns how many paged attentions it fused.
pub fn absorb_paged_rope(graph: &mut Graph) -> Result<usize, PassError> {
    let attentions: Vec<NodeId> = graph
        .node_ids()
        .filter(|&n| is(graph, n, FusedOp::PagedAttention))
        .collect();
    let mut fused = 0;
    for att in attentions {
        let ops = graph.operands(att);
        let (q, k) = (ops[0], ops[1]);
        if !(is(graph, q, FusedOp::Rope) && is(graph, k, FusedOp::Rope)) {
            continue;
        }
        let (q_ops, k_ops) = (graph.operands(q), graph.operands(k));
        // The same tables rotate q and k, and nothing else reads the rotated values.
        let only_here = |n: NodeId| graph.users(n).iter().all(|&u| u == att);
        if q_ops[1..] != k_ops[1..] || !only_here(q) || !only_here(k) {
            continue;
        }
        let mut operands = vec![q_ops[0], k_ops[0], ops[2], q_ops[1], q_ops[2]];
        operands.extend_from_slice(&ops[3..]);
        let new = graph
            .add(Op::Fused(FusedOp::PagedDecodeAttention), &operands)
            .map_err(|source| PassError::Fused {
                pass: "absorb-paged-rope",
                source,
            })?;
        let provenance = merged(graph, &[att, q, k], "absorb-paged-rope");
        let layer = graph.node(att).layer;
        let node = graph.node_mut(new);
        node.provenance = provenance;
        node.layer = layer;
        // The same tuple: its `get`s now read the new node.
        graph.replace_all_uses(att, new);
        fused += 1;
    }
    graph.remove_dead();
    Ok(fused)
}

/// `merge-gemv`; returns how many kernels it removed.
pub fn merge_gemv(graph: &mut Graph) -> Result<usize, PassError> {
    // Single-weight norm GEMVs, grouped by kind and by their (x, w, eps) prologue
    // (Llama's), or (x, w, eps, c) (Gemma's offset norm).
    let mut groups: BTreeMap<(FusedOp, Vec<NodeId>), Vec<NodeId>> = BTreeMap::new();
    for n in graph.node_ids().collect::<Vec<_>>() {
        for (kind, prologue) in [
            (FusedOp::RmsNormLinear, 3),
            (FusedOp::OffsetRmsNormLinear, 4),
        ] {
            if is(graph, n, kind) {
                let ops = graph.operands(n);
                if ops.len() == prologue + 1 {
                    groups
                        .entry((kind, ops[..prologue].to_vec()))
                        .or_default()
                        .push(n);
                }
            }
        }
    }
    // Plain GEMVs, grouped by their input (OLMo 2's q, k and v read the residual
    // stream, with no norm to share): they become one `fused.multi_linear`.
    let mut plain: BTreeMap<NodeId, Vec<NodeId>> = BTreeMap::new();
    for n in graph.node_ids().collect::<Vec<_>>() {
        if graph.op(n) == &Op::Linear {
            plain.entry(graph.operands(n)[0]).or_default().push(n);
        }
    }
    let mut removed = 0;
    let normed = groups.into_iter().map(|((kind, prologue), members)| {
        let weights: Vec<NodeId> = members
            .iter()
            .map(|&m| graph.operands(m)[prologue.len()])
            .collect();
        (kind, prologue, weights, members)
    });
    let plain = plain.into_iter().map(|(x, members)| {
        let weights: Vec<NodeId> = members.iter().map(|&m| graph.operands(m)[1]).collect();
        (FusedOp::MultiLinear, vec![x], weights, members)
    });
    let merges: Vec<_> = normed.chain(plain).collect();
    for (op, prologue, weights, members) in merges {
        if members.len() < 2 {
            continue;
        }
        let mut operands = prologue;
        operands.extend(weights);
        let new = graph
            .add(Op::Fused(op), &operands)
            .map_err(|source| PassError::Fused {
                pass: "merge-gemv",
                source,
            })?;
        let provenance = merged(graph, &members, "merge-gemv");
        let layer = graph.node(members[0]).layer;
        let node = graph.node_mut(new);
        node.provenance = provenance;
        node.layer = layer;
        replace_with_tuple(graph, new, &members)?;
        removed += members.len() - 1;
    }
    graph.remove_dead();
    Ok(removed)
}
