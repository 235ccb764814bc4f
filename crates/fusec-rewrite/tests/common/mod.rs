//! Helpers for the rewrite tests: fuse IR text with a rule set.

#![allow(dead_code)]

use fusec_ir::{text, Bindings, Graph};
use fusec_rewrite::{fuse, FuseReport, Limits, Options, RuleSet};

pub fn bindings() -> Bindings {
    Bindings::new().with("B", 1).with("S", 31)
}

pub fn fuse_with(graph: &Graph, rules: &RuleSet, limits: Limits) -> (Graph, FuseReport) {
    let gpu = fusec_ir::hardware::gpu("h100-sxm").expect("built-in gpu");
    let b = bindings();
    fuse(
        graph,
        &Options {
            rules,
            gpu,
            bindings: &b,
            limits,
        },
    )
    .expect("fusion succeeds")
}

pub fn fuse_text(src: &str, rules: &RuleSet) -> (String, FuseReport) {
    let g = text::parse(src).expect("valid IR");
    let (f, r) = fuse_with(&g, rules, Limits::default());
    (text::print(&f).expect("acyclic"), r)
}
