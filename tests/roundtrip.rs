//! The text form is canonical: printing a parsed dump gives the same text, for every
//! example model and every harness input, and the parsed graph verifies.

mod common;

use fusec::pipeline;
use fusec_ir::{text, verify};

#[test]
fn print_parse_print_is_identity() {
    let models: Vec<_> = common::examples()
        .into_iter()
        .chain(common::test_inputs())
        .collect();
    assert!(models.len() >= 8);
    for model in models {
        let spec = pipeline::load(&model, None, None).expect("valid model");
        let eager = pipeline::eager(&spec).expect("eager graph builds");
        let printed = text::print(&eager).expect("acyclic");
        let parsed = text::parse(&printed)
            .unwrap_or_else(|e| panic!("{}: reparse failed: {e}", model.display()));
        verify(&parsed).unwrap_or_else(|e| panic!("{}: {e}", model.display()));
        let reprinted = text::print(&parsed).expect("acyclic");
        assert!(
            printed == reprinted,
            "{}: print(parse(text)) != text",
            model.display()
        );
    }
}

#[test]
fn dumps_are_deterministic() {
    let spec = pipeline::load(&common::root().join("examples/tiny.toml"), None, None)
        .expect("valid model");
    let a = text::print(&pipeline::eager(&spec).expect("builds")).expect("acyclic");
    let b = text::print(&pipeline::eager(&spec).expect("builds")).expect("acyclic");
    assert_eq!(a, b);
}
