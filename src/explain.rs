//! `fusec explain`: why a node is fused, what it replaced, and which rules almost fired.

use std::collections::BTreeMap;
use std::fmt::Write;

use fusec_ir::Graph;
use fusec_rewrite::{FuseReport, RuleSet};

/// The `%N` numbering of a graph's text form, and the printed line of each value.
fn lines(graph: &Graph) -> Vec<String> {
    fusec_ir::text::print(graph)
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('%'))
        .map(String::from)
        .collect()
}

fn value_number(line: &str) -> Option<usize> {
    line.strip_prefix('%')?.split_once(' ')?.0.parse().ok()
}

fn covered_positions(line: &str) -> Vec<usize> {
    let Some(start) = line.find("covers=[") else {
        return Vec::new();
    };
    line[start + 8..]
        .split(']')
        .next()
        .unwrap_or("")
        .split(',')
        .filter_map(|c| c.trim().strip_prefix('%')?.split(' ').next()?.parse().ok())
        .collect()
}

/// Explains fused node `%node` (numbered as in the fused dump), or lists every fused
/// node when `node` is `None`.
pub fn explain(
    eager: &Graph,
    fused: &Graph,
    report: &FuseReport,
    rules: &RuleSet,
    node: Option<usize>,
) -> Result<String, String> {
    let eager_lines = lines(eager);
    let fused_lines = lines(fused);
    let mut out = String::new();
    let algebra: BTreeMap<&str, (&str, &str)> = rules
        .rules()
        .iter()
        .map(|r| (r.name.as_str(), (r.topic.as_str(), r.algebra.as_str())))
        .collect();
    let Some(n) = node else {
        let _ = writeln!(out, "fused kernels (fusec explain MODEL --node N for one):");
        for line in &fused_lines {
            if line.contains("rules=[") {
                let (code, comment) = line.split_once("  ; ").unwrap_or((line, ""));
                let ops = covered_positions(line).len();
                let rules = comment.split("covers=").next().unwrap_or("").trim();
                let _ = writeln!(
                    out,
                    "  {}  [{ops} eager ops; {rules}]",
                    code.split(" : ").next().unwrap_or(code)
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
    let line = fused_lines
        .iter()
        .find(|l| value_number(l) == Some(n))
        .ok_or_else(|| {
            format!(
                "the fused graph has no value %{n} (it has %0..%{})",
                fused_lines.len().saturating_sub(1)
            )
        })?;
    let _ = writeln!(out, "{}", line.split("  ; ").next().unwrap_or(line));
    if !line.contains("rules=[") {
        let _ = writeln!(
            out,
            "  not a fused node: no rule produced it; it is as in the eager graph"
        );
        return Ok(out);
    }
    let prov = fused
        .topo_order()
        .ok()
        .and_then(|o| o.get(n).copied())
        .map(|id| fused.node(id).provenance.clone())
        .unwrap_or_default();
    let _ = writeln!(out, "why: built by {} rule(s), in order:", prov.rules.len());
    for r in &prov.rules {
        match algebra.get(r.as_str()) {
            Some((topic, alg)) => {
                let _ = writeln!(out, "  {r} ({topic}.rules): {}", alg.replace('\n', " "));
            }
            None => {
                let _ = writeln!(out, "  {r} (graph pass, see fusec-rewrite/src/passes.rs)");
            }
        }
    }
    let positions = covered_positions(line);
    let _ = writeln!(out, "replaced {} eager op(s):", positions.len());
    let mut sorted = positions.clone();
    sorted.sort_unstable();
    for p in &sorted {
        let text = eager_lines.get(*p).map(String::as_str).unwrap_or("?");
        let _ = writeln!(out, "  {text}");
    }
    let misses: Vec<_> = report
        .near_misses
        .iter()
        .filter(|m| sorted.binary_search(&m.at).is_ok())
        .collect();
    if !misses.is_empty() {
        let _ = writeln!(out, "near misses among them:");
        for m in misses {
            let _ = writeln!(out, "  at %{}: {} did not fire: {}", m.at, m.rule, m.reason);
        }
    }
    Ok(out)
}
