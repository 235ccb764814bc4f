//! The data-driven snapshot harness: for every model in `tests/in/`, the eager IR dump
//! and the compile summary, checked against `tests/snapshots/`. Bless changes with
//! `INSTA_UPDATE=always cargo test --test snapshots` and review the diff.

mod common;

use fusec::pipeline;
use fusec::summary::Summary;
use fusec_ir::text;

#[test]
fn eager_dumps_and_summaries() {
    let inputs = common::test_inputs();
    assert!(inputs.len() >= 3, "tests/in holds the harness inputs");
    for input in inputs {
        let name = common::input_name(&input);
        let spec = pipeline::load(&input, None, None).expect("harness inputs are valid");
        let eager = pipeline::eager(&spec).expect("eager graph builds");
        let dump = text::print(&eager).expect("acyclic");
        insta::assert_snapshot!(format!("{name}.eager"), dump);
        let summary = Summary::new(&spec, &eager).expect("all symbols bound");
        insta::assert_snapshot!(format!("{name}.summary"), summary.render());
    }
}
