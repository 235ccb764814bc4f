//! Fusion by equality saturation.
//!
//! The pipeline ([`fuse`]), each phase verified:
//!
//! 1. `load`: the eager graph becomes an [`egg`] e-graph over [`lang::ENode`] (the IR's
//!    own `Op` with child e-classes); the analysis ([`analysis`]) types every class.
//! 2. `saturate`: egg's runner applies the rules ([`ruleset`]: text files by topic,
//!    compiled in, plus any the user loads) until saturation or a limit.
//! 3. `extract`: the cheapest graph under the GPU cost model ([`egraph::GpuCost`]).
//! 4. `absorb-kv-append`, `merge-gemv`: graph passes for multi-result kernels
//!    ([`passes`]).
//!
//! Every fused node records the rules that built it and the eager ops it covers.
//!
//! What a rule does to a graph is tested by files, not Rust: each
//! `tests/filetests/**/*.fir` holds an input graph, the rules to load and the expected
//! result as check lines or a whole blessed fused graph (`tests/filetests.rs` documents
//! the directives; `FUSEC_BLESS=1` rewrites `; output:` blocks).

pub mod analysis;
pub mod condition;
pub mod egraph;
pub mod lang;
pub mod passes;
pub mod pattern;
pub mod precision;
pub mod rule;
pub mod ruleset;
pub mod segment;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use egg::{Rewrite, Runner, SimpleScheduler, StopReason};
use fusec_ir::hardware::GpuSpec;
use fusec_ir::{verify, Bindings, Graph, NodeId};

pub use condition::{CondArg, CondCtx, CondError, CondFn};
pub use pattern::Match;
pub use rule::{NearMiss, Rule, RuleError};
pub use ruleset::{RuleFileError, RuleSet};

use crate::analysis::TypeAnalysis;
use crate::lang::ENode;
use crate::rule::EggRule;

/// Limits of the equality-saturation runner.
#[derive(Clone, Debug)]
pub struct Limits {
    pub iterations: usize,
    pub nodes: usize,
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            iterations: 32,
            nodes: 500_000,
            time: Duration::from_secs(10),
        }
    }
}

/// What fusion needs: the rules, the target, the symbol values costs use, the limits.
#[derive(Clone, Debug)]
pub struct Options<'a> {
    pub rules: &'a RuleSet,
    pub gpu: &'a GpuSpec,
    pub bindings: &'a Bindings,
    pub limits: Limits,
}

/// How fusion went, besides the fused graph.
#[derive(Clone, Debug)]
pub struct FuseReport {
    /// Why saturation stopped: `saturated`, or the limit it hit.
    pub stop_reason: String,
    /// Whether a limit stopped the runner before saturation (the result is correct
    /// but may be less fused).
    pub hit_limit: bool,
    pub iterations: usize,
    pub egraph_nodes: usize,
    pub egraph_classes: usize,
    /// Rules whose pattern matched but whose condition did not hold, once each.
    pub near_misses: Vec<NearMiss>,
    /// Applications rejected because the result did not type-check.
    pub rejected: Vec<RuleError>,
    /// Time per phase.
    pub phases: Vec<(&'static str, Duration)>,
}

/// A fusion failure: an invariant broke. Bad rules are reported in [`FuseReport`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{phase}: {message}")]
pub struct FuseError {
    pub phase: &'static str,
    pub message: String,
}

fn verified(phase: &'static str, g: Graph) -> Result<Graph, FuseError> {
    verify(&g).map_err(|e| FuseError {
        phase,
        message: format!("verifier: {e}"),
    })?;
    Ok(g)
}

/// A fused segment kept for reuse by segments of the same shape.
struct Template {
    fused: Graph,
    /// The eager segment it was fused from, and that segment's eager positions.
    eager: Graph,
    positions: HashMap<NodeId, usize>,
    near_misses: Vec<NearMiss>,
}

/// Fuses `eager` and returns the fused graph with a report. See [`segment`] for why
/// the work is done per layer.
pub fn fuse(eager: &Graph, opts: &Options<'_>) -> Result<(Graph, FuseReport), FuseError> {
    let t = Instant::now();
    let segments = segment::split(eager).map_err(|e| FuseError {
        phase: "split",
        message: e.to_string(),
    })?;
    let mut report = FuseReport {
        stop_reason: "saturated".into(),
        hit_limit: false,
        iterations: 0,
        egraph_nodes: 0,
        egraph_classes: 0,
        near_misses: Vec::new(),
        rejected: Vec::new(),
        phases: vec![("split", t.elapsed())],
    };
    // Fused segments by shape key: the fused graph, the eager segment it came from.
    let mut cache: HashMap<String, Template> = HashMap::new();
    let mut stitched = segment::Stitcher::new(eager);
    for seg in &segments {
        let key = segment::shape_key(&seg.graph).map_err(|e| FuseError {
            phase: "split",
            message: e.to_string(),
        })?;
        let fused = match cache.get(&key) {
            Some(t) => {
                let (fused, positions) = segment::reuse(&t.fused, &t.eager, &t.positions, seg);
                report
                    .near_misses
                    .extend(segment::remap_misses(&t.near_misses, &positions));
                fused
            }
            None => {
                let (fused, seg_report) = fuse_segment(&seg.graph, &seg.positions, opts)?;
                if seg_report.hit_limit {
                    report.hit_limit = true;
                    report.stop_reason = seg_report.stop_reason.clone();
                }
                report.iterations = report.iterations.max(seg_report.iterations);
                report.egraph_nodes += seg_report.egraph_nodes;
                report.egraph_classes += seg_report.egraph_classes;
                report
                    .near_misses
                    .extend(seg_report.near_misses.iter().cloned());
                report.rejected.extend(seg_report.rejected.iter().cloned());
                for (phase, d) in seg_report.phases {
                    match report.phases.iter_mut().find(|(p, _)| *p == phase) {
                        Some((_, total)) => *total += d,
                        None => report.phases.push((phase, d)),
                    }
                }
                cache.insert(
                    key,
                    Template {
                        fused: fused.clone(),
                        eager: seg.graph.clone(),
                        positions: seg.positions.clone(),
                        near_misses: seg_report.near_misses,
                    },
                );
                fused
            }
        };
        stitched.add(seg, &fused).map_err(|e| FuseError {
            phase: "stitch",
            message: e.to_string(),
        })?;
    }
    report.near_misses.sort();
    report.near_misses.dedup();
    report
        .rejected
        .sort_by(|a, b| (&a.rule, &a.message).cmp(&(&b.rule, &b.message)));
    report.rejected.dedup();
    let t = Instant::now();
    let mut graph = stitched.finish();
    graph
        .attrs
        .insert("egraph.stop".into(), report.stop_reason.clone());
    graph
        .attrs
        .insert("egraph.iterations".into(), report.iterations.to_string());
    let graph = verified("stitch", graph.reordered())?;
    report.phases.push(("stitch", t.elapsed()));
    Ok((graph, report))
}

/// Saturates, extracts and runs the graph passes on one segment.
fn fuse_segment(
    eager: &Graph,
    positions: &HashMap<NodeId, usize>,
    opts: &Options<'_>,
) -> Result<(Graph, FuseReport), FuseError> {
    let mut phases = Vec::new();
    let t = Instant::now();
    let loaded = egraph::load(eager, positions).map_err(|e| FuseError {
        phase: "load",
        message: e.to_string(),
    })?;
    phases.push(("load", t.elapsed()));

    let t = Instant::now();
    let egg_rules: Vec<Arc<EggRule>> = opts
        .rules
        .rules()
        .iter()
        .map(|r| Arc::new(EggRule::new(r.clone(), &|n| opts.rules.condition(n))))
        .collect();
    let rewrites: Vec<Rewrite<ENode, TypeAnalysis>> = egg_rules
        .iter()
        .map(|r| {
            Rewrite::new(
                r.rule.name.as_str(),
                SharedRule(r.clone()),
                SharedRule(r.clone()),
            )
            .map_err(|message| FuseError {
                phase: "saturate",
                message: format!("rule `{}`: {message}", r.rule.name),
            })
        })
        .collect::<Result<_, _>>()?;
    let outputs = loaded.outputs.clone();
    let runner = Runner::<ENode, TypeAnalysis, ()>::new(TypeAnalysis::default())
        .with_egraph(loaded.egraph)
        .with_iter_limit(opts.limits.iterations)
        .with_node_limit(opts.limits.nodes)
        .with_time_limit(opts.limits.time)
        .with_scheduler(SimpleScheduler)
        .run(&rewrites);
    let (stop_reason, hit_limit) = match &runner.stop_reason {
        Some(StopReason::Saturated) | None => ("saturated".to_string(), false),
        Some(StopReason::IterationLimit(n)) => (format!("iteration-limit-{n}"), true),
        Some(StopReason::NodeLimit(n)) => (format!("node-limit-{n}"), true),
        Some(StopReason::TimeLimit(s)) => (format!("time-limit-{s}s"), true),
        Some(StopReason::Other(s)) => (s.replace(' ', "-"), true),
    };
    phases.push(("saturate", t.elapsed()));

    let mut near_misses: Vec<NearMiss> = Vec::new();
    let mut rejected: Vec<RuleError> = Vec::new();
    for r in &egg_rules {
        if let Ok(nm) = r.near_misses.lock() {
            near_misses.extend(nm.iter().cloned());
        }
        if let Ok(e) = r.errors.lock() {
            rejected.extend(e.iter().cloned());
        }
    }
    near_misses.sort();
    near_misses.dedup();

    let t = Instant::now();
    let loaded = egraph::Loaded {
        egraph: runner.egraph,
        outputs,
    };
    let cost = egraph::GpuCost {
        egraph: &loaded.egraph,
        gpu: opts.gpu,
        bindings: opts.bindings,
    };
    let extracted =
        egraph::extract(&loaded, cost, &eager.name, eager.attrs.clone()).map_err(|e| {
            FuseError {
                phase: "extract",
                message: e.to_string(),
            }
        })?;
    let mut graph = verified("extract", extracted)?;
    phases.push(("extract", t.elapsed()));

    let t = Instant::now();
    passes::absorb_kv_append(&mut graph).map_err(|e| FuseError {
        phase: "absorb-kv-append",
        message: e.to_string(),
    })?;
    let mut graph = verified("absorb-kv-append", graph)?;
    passes::absorb_paged_rope(&mut graph).map_err(|e| FuseError {
        phase: "absorb-paged-rope",
        message: e.to_string(),
    })?;
    let mut graph = verified("absorb-paged-rope", graph)?;
    passes::merge_gemv(&mut graph).map_err(|e| FuseError {
        phase: "merge-gemv",
        message: e.to_string(),
    })?;
    let graph = verified("merge-gemv", graph)?;
    phases.push(("passes", t.elapsed()));

    let report = FuseReport {
        stop_reason,
        hit_limit,
        iterations: runner.iterations.len(),
        egraph_nodes: loaded.egraph.total_number_of_nodes(),
        egraph_classes: loaded.egraph.number_of_classes(),
        near_misses,
        rejected,
        phases,
    };
    Ok((graph, report))
}

/// One rule shared as egg's searcher and applier.
struct SharedRule(Arc<EggRule>);

impl egg::Searcher<ENode, TypeAnalysis> for SharedRule {
    fn search_eclass_with_limit(
        &self,
        egraph: &analysis::FGraph,
        eclass: egg::Id,
        limit: usize,
    ) -> Option<egg::SearchMatches<'_, ENode>> {
        self.0.search_eclass_with_limit(egraph, eclass, limit)
    }

    fn vars(&self) -> Vec<egg::Var> {
        egg::Searcher::vars(&*self.0)
    }
}

impl egg::Applier<ENode, TypeAnalysis> for SharedRule {
    fn apply_one(
        &self,
        egraph: &mut analysis::FGraph,
        eclass: egg::Id,
        subst: &egg::Subst,
        ast: Option<&egg::PatternAst<ENode>>,
        rule_name: egg::Symbol,
    ) -> Vec<egg::Id> {
        self.0.apply_one(egraph, eclass, subst, ast, rule_name)
    }
}
