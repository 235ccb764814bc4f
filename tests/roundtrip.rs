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
    let rules = pipeline::rules(&[]).expect("built-in rules load");
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
        let (fused, _) = pipeline::fuse(&spec, &eager, &rules).expect("fusion succeeds");
        let printed = text::print(&fused).expect("acyclic");
        let parsed = text::parse(&printed)
            .unwrap_or_else(|e| panic!("{}: fused reparse failed: {e}", model.display()));
        verify(&parsed).unwrap_or_else(|e| panic!("{}: {e}", model.display()));
        assert!(
            printed == text::print(&parsed).expect("acyclic"),
            "{}: fused print(parse(text)) != text",
            model.display()
        );
    }
}

#[test]
fn dumps_are_deterministic() {
    let spec = pipeline::load(&common::root().join("examples/llama-3-8b.toml"), None, None)
        .expect("valid model");
    let rules = pipeline::rules(&[]).expect("built-in rules load");
    let dump = || {
        let eager = pipeline::eager(&spec).expect("builds");
        let (fused, _) = pipeline::fuse(&spec, &eager, &rules).expect("fuses");
        (
            text::print(&eager).expect("acyclic"),
            text::print(&fused).expect("acyclic"),
        )
    };
    assert_eq!(dump(), dump());
}
