//! The data-driven snapshot harness: for every model in `tests/in/` (a `.toml` spec or
//! a directory holding a Hugging Face `config.json`), the eager IR dump, the fused IR
//! dump, the compile summary, the eager and fused dumps of a 4-token prefill step, and
//! the fused dump and summary of the paged step, checked against `tests/snapshots/`.
//!
//! Each input and dump is its own case: `insta::glob!` runs every input and reports
//! every failing snapshot, and a pipeline error becomes the text compared with the
//! snapshot, so one broken input or dump hides no other. Bless changes with
//! `INSTA_UPDATE=always cargo test --test snapshots` and review the diff.

use fusec::model::blocks::{Logits, StepDims};
use fusec::pipeline;
use fusec::summary::Summary;
use fusec_ir::text;

#[test]
fn eager_and_fused_dumps_and_summaries() {
    insta::glob!("in/*", |input| {
        let rules = pipeline::rules(&[]).map_err(|e| format!("rules: {e}"));
        let spec = pipeline::load(input, None, None).map_err(|e| format!("load: {e}"));
        let eager = spec
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|spec| pipeline::eager(spec).map_err(|e| format!("eager: {e}")));
        let dump = |g: &fusec_ir::Graph| text::print(g).unwrap_or_else(|e| format!("print: {e}"));
        insta::assert_snapshot!("eager", eager.as_ref().map_or_else(Clone::clone, dump));

        let fused = match (&spec, &eager, &rules) {
            (Ok(spec), Ok(eager), Ok(rules)) => pipeline::fuse(spec, eager, rules)
                .map_err(|e| format!("fuse: {e}"))
                .and_then(|(fused, report)| match report.hit_limit {
                    false => Ok(fused),
                    true => Err(format!("fusion hit a limit: {}", report.stop_reason)),
                }),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => Err(e.clone()),
        };
        insta::assert_snapshot!("fused", fused.as_ref().map_or_else(Clone::clone, dump));

        let summary = match (&spec, &eager, &fused) {
            (Ok(spec), Ok(eager), Ok(fused)) => pipeline::target_gpu(spec)
                .map_err(|e| format!("gpu: {e}"))
                .and_then(|gpu| {
                    Summary::new(spec, gpu, eager, Some(fused)).map_err(|e| format!("summary: {e}"))
                })
                .map(|s| s.render()),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => Err(e.clone()),
        };
        insta::assert_snapshot!("summary", summary.unwrap_or_else(|e| e));

        // The prefill step of a 4-token chunk (logits of the last position), eager and
        // fused: the graph `fusec run --prefill-chunk 4` runs.
        let prefill = spec.as_ref().map_err(Clone::clone).and_then(|spec| {
            pipeline::eager_prefill(spec, &StepDims::prefill(4, Logits::Last))
                .map_err(|e| format!("prefill: {e}"))
                .map(|g| (spec, g))
        });
        insta::assert_snapshot!(
            "prefill_eager",
            prefill.as_ref().map_or_else(Clone::clone, |(_, g)| dump(g))
        );
        let prefill_fused = match (&prefill, &rules) {
            (Ok((spec, eager)), Ok(rules)) => pipeline::fuse(spec, eager, rules)
                .map(|(g, _)| dump(&g))
                .map_err(|e| format!("fuse prefill: {e}")),
            (Err(e), _) | (_, Err(e)) => Err(e.clone()),
        };
        insta::assert_snapshot!("prefill_fused", prefill_fused.unwrap_or_else(|e| e));

        // The paged decode step of blocks of 16 positions, fused, and its summary with
        // every sequence holding the spec's context: what `fusec compile --paged 16`
        // dumps and prints.
        let paged = match (&spec, &rules) {
            (Ok(spec), Ok(rules)) => pipeline::eager_paged(spec, 16)
                .and_then(|eager| {
                    let (fused, _) = pipeline::fuse(spec, &eager, rules)?;
                    Ok((spec, eager, fused))
                })
                .map_err(|e| format!("paged: {e}")),
            (Err(e), _) | (_, Err(e)) => Err(e.clone()),
        };
        insta::assert_snapshot!(
            "paged_fused",
            paged
                .as_ref()
                .map_or_else(Clone::clone, |(_, _, g)| dump(g))
        );
        let paged_summary = paged.and_then(|(spec, eager, fused)| {
            let gpu = pipeline::target_gpu(spec).map_err(|e| format!("gpu: {e}"))?;
            let lengths = vec![spec.decode.context; spec.decode.batch as usize];
            Summary::paged(spec, gpu, &eager, Some(&fused), 16, lengths)
                .map(|s| s.render())
                .map_err(|e| format!("summary: {e}"))
        });
        insta::assert_snapshot!("paged_summary", paged_summary.unwrap_or_else(|e| e));
    });
}
