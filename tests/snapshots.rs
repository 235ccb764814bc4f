//! The data-driven snapshot harness: for every model in `tests/in/`, the eager IR dump,
//! the fused IR dump and the compile summary, checked against `tests/snapshots/`.
//! Bless changes with `INSTA_UPDATE=always cargo test --test snapshots` and review the
//! diff.

mod common;

use fusec::pipeline;
use fusec::summary::Summary;
use fusec_ir::text;

#[test]
fn eager_and_fused_dumps_and_summaries() {
    let inputs = common::test_inputs();
    assert!(inputs.len() >= 3, "tests/in holds the harness inputs");
    let rules = pipeline::rules(&[]).expect("built-in rules load");
    for input in inputs {
        let name = common::input_name(&input);
        let spec = pipeline::load(&input, None, None).expect("harness inputs are valid");
        let eager = pipeline::eager(&spec).expect("eager graph builds");
        insta::assert_snapshot!(
            format!("{name}.eager"),
            text::print(&eager).expect("acyclic")
        );
        let (fused, report) = pipeline::fuse(&spec, &eager, &rules).expect("fusion succeeds");
        assert!(!report.hit_limit, "{name}: {}", report.stop_reason);
        insta::assert_snapshot!(
            format!("{name}.fused"),
            text::print(&fused).expect("acyclic")
        );
        let gpu = pipeline::target_gpu(&spec).expect("known gpu");
        let summary = Summary::new(&spec, gpu, &eager, Some(&fused)).expect("all symbols bound");
        insta::assert_snapshot!(format!("{name}.summary"), summary.render());
    }
}
