//! The canonical text form of a graph.
//!
//! ```text
//! graph "tiny" layers=2 {
//!   %0 = input{name="input_ids"} : i32[B,1]
//!   %1 = weight@model.embed_tokens.weight : f32[256,64]
//!   %2 = embedding(%1, %0) : f32[B,1,64]
//!   layer 0 {
//!     %3 = linear(%2, %9) : f32[B,1,64]  ; rules=[a,b] covers=[binary.add x2]
//!   }
//!   output "logits" = %3
//!   state "kv.0.key" = %7
//! }
//! ```
//!
//! Values are numbered `%0, %1, ...` densely in the canonical topological order
//! ([`Graph::topo_order`]); attributes are sorted; a node's provenance is its trailing
//! comment. Printing the result of parsing a printed graph gives the same text.

use std::collections::HashMap;
use std::fmt::Write;

use crate::graph::{CycleError, Graph, NodeId, OutputKind, Provenance};

/// Renders `graph` in canonical text form.
pub fn print(graph: &Graph) -> Result<String, CycleError> {
    let order = graph.topo_order()?;
    let numbering: HashMap<NodeId, usize> =
        order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let mut out = String::new();
    let _ = write!(out, "graph {:?}", graph.name);
    for (k, v) in &graph.attrs {
        let _ = write!(out, " {k}={v}");
    }
    out.push_str(" {\n");
    let mut open_layer: Option<u32> = None;
    for (i, &id) in order.iter().enumerate() {
        let node = graph.node(id);
        if node.layer != open_layer {
            if open_layer.is_some() {
                out.push_str("  }\n");
            }
            if let Some(l) = node.layer {
                let _ = writeln!(out, "  layer {l} {{");
            }
            open_layer = node.layer;
        }
        let indent = if open_layer.is_some() { "    " } else { "  " };
        let _ = write!(out, "{indent}%{i} = {}", node.op);
        let operands = graph.operands(id);
        if !operands.is_empty() {
            out.push('(');
            for (j, o) in operands.iter().enumerate() {
                if j > 0 {
                    out.push_str(", ");
                }
                let _ = write!(out, "%{}", numbering[o]);
            }
            out.push(')');
        }
        let _ = write!(out, " : {}", node.ty);
        if !node.provenance.is_empty() {
            let _ = write!(out, "  ; {}", provenance_comment(&node.provenance));
        }
        out.push('\n');
    }
    if open_layer.is_some() {
        out.push_str("  }\n");
    }
    for o in graph.outputs() {
        let kw = match o.kind {
            OutputKind::Data => "output",
            OutputKind::State => "state",
        };
        let _ = writeln!(out, "  {kw} {:?} = %{}", o.name, numbering[&o.value]);
    }
    out.push_str("}\n");
    Ok(out)
}

/// `rules=[a,b] covers=[binary.add x2,unary.rsqrt]`.
pub fn provenance_comment(p: &Provenance) -> String {
    format!(
        "rules=[{}] covers=[{}]",
        p.rules.join(","),
        p.covers.join(",")
    )
}
