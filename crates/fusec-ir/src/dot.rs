//! Graphviz DOT export: one box per node, labelled with its `%N`, op and type; views and
//! leaves are drawn dashed, so the kernels stand out.

use std::collections::HashMap;
use std::fmt::Write;

use crate::graph::{CycleError, Graph, NodeId};

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Renders `graph` as a DOT digraph, nodes numbered as in the text form.
pub fn to_dot(graph: &Graph) -> Result<String, CycleError> {
    let order = graph.topo_order()?;
    let number: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let mut out = String::new();
    let _ = writeln!(out, "digraph \"{}\" {{", escape(&graph.name));
    out.push_str("  rankdir=TB;\n  node [shape=box, fontname=\"monospace\", fontsize=10];\n");
    for &id in &order {
        let node = graph.node(id);
        let style = if node.op.launches_kernel() {
            "solid"
        } else {
            "dashed"
        };
        let _ = writeln!(
            out,
            "  n{} [label=\"%{} = {}\\n{}\", style={style}];",
            number[&id],
            number[&id],
            escape(&node.op.to_string()),
            escape(&node.ty.to_string()),
        );
    }
    for &id in &order {
        for (port, o) in graph.operands(id).into_iter().enumerate() {
            let _ = writeln!(
                out,
                "  n{} -> n{} [label=\"{port}\"];",
                number[&o], number[&id]
            );
        }
    }
    for o in graph.outputs() {
        let _ = writeln!(
            out,
            "  \"out:{}\" [shape=oval];\n  n{} -> \"out:{}\";",
            escape(&o.name),
            number[&o.value],
            escape(&o.name)
        );
    }
    out.push_str("}\n");
    Ok(out)
}
