//! `fusec explain`: why a node is fused, what it replaced, and which rules almost fired.

use std::collections::BTreeMap;
use std::fmt::Write;

use fusec_ir::{Graph, Provenance};
use fusec_rewrite::{FuseReport, RuleSet};

/// The printed line of each value of a graph, by its `%N`, without the comment.
fn lines(graph: &Graph) -> Vec<String> {
    fusec_ir::text::print(graph)
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('%'))
        .map(|l| l.split("  ; ").next().unwrap_or(l).to_string())
        .collect()
}

/// The eager `%N` positions a fused node covers (its provenance says `%N op.name`).
fn covered_positions(p: &Provenance) -> Vec<usize> {
    let mut positions: Vec<usize> = p
        .covers
        .iter()
        .filter_map(|c| c.strip_prefix('%')?.split(' ').next()?.parse().ok())
        .collect();
    positions.sort_unstable();
    positions.dedup();
    positions
}

/// Why a node cannot be explained.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    #[error(transparent)]
    Cycle(#[from] fusec_ir::graph::CycleError),
    #[error("the fused graph has no value %{value} (it has %0..%{last})")]
    NoSuchValue { value: usize, last: usize },
}

/// Explains fused node `%node` (numbered as in the fused dump), or lists every fused
/// node when `node` is `None`.
pub fn explain(
    eager: &Graph,
    fused: &Graph,
    report: &FuseReport,
    rules: &RuleSet,
    node: Option<usize>,
) -> Result<String, ExplainError> {
    let order = fused.topo_order()?;
    let fused_lines = lines(fused);
    let line = |i: usize| fused_lines.get(i).map(String::as_str).unwrap_or("?");
    let mut out = String::new();
    let Some(n) = node else {
        let _ = writeln!(out, "fused kernels (fusec explain MODEL --node N for one):");
        for (i, &id) in order.iter().enumerate() {
            let p = &fused.node(id).provenance;
            if !p.is_empty() {
                let code = line(i).split(" : ").next().unwrap_or("");
                let _ = writeln!(
                    out,
                    "  {code}  [{} eager ops; rules {}]",
                    covered_positions(p).len(),
                    p.rules.join(", ")
                );
            }
        }
        let mut by_rule: BTreeMap<&str, usize> = BTreeMap::new();
        for m in &report.near_misses {
            *by_rule.entry(m.rule.as_str()).or_default() += 1;
        }
        if !by_rule.is_empty() {
            let _ = writeln!(
                out,
                "near misses (a rule's pattern matched, a condition did not hold):"
            );
            for (rule, count) in by_rule {
                let _ = writeln!(out, "  {rule}: {count}");
            }
        }
        return Ok(out);
    };
    let id = *order.get(n).ok_or(ExplainError::NoSuchValue {
        value: n,
        last: order.len().saturating_sub(1),
    })?;
    let _ = writeln!(out, "{}", line(n));
    let prov = &fused.node(id).provenance;
    if prov.is_empty() {
        let _ = writeln!(
            out,
            "  not a fused node: no rule produced it; it is as in the eager graph"
        );
        return Ok(out);
    }
    let _ = writeln!(out, "why: built by {} rule(s), in order:", prov.rules.len());
    for r in &prov.rules {
        match rules.rules().iter().find(|rule| &rule.name == r) {
            Some(rule) => {
                let _ = writeln!(
                    out,
                    "  {r} ({}.rules): {}",
                    rule.topic,
                    rule.algebra.replace('\n', " ")
                );
            }
            None => {
                let _ = writeln!(out, "  {r} (graph pass, see fusec-rewrite/src/passes.rs)");
            }
        }
    }
    let positions = covered_positions(prov);
    let eager_lines = lines(eager);
    let _ = writeln!(out, "replaced {} eager op(s):", positions.len());
    for p in &positions {
        let text = eager_lines.get(*p).map(String::as_str).unwrap_or("?");
        let _ = writeln!(out, "  {text}");
    }
    let misses: Vec<_> = report
        .near_misses
        .iter()
        .filter(|m| positions.binary_search(&m.at).is_ok())
        .collect();
    if !misses.is_empty() {
        let _ = writeln!(out, "near misses among them:");
        for m in misses {
            let _ = writeln!(out, "  at %{}: {} did not fire: {}", m.at, m.rule, m.reason);
        }
    }
    Ok(out)
}
