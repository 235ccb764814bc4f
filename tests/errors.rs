//! Library errors keep their cause and their text: an unreadable rule file is a
//! `PipelineError::Io` whose source is the `io::Error`, printed as before.

use std::error::Error as _;
use std::path::PathBuf;

use fusec::pipeline::{self, PipelineError};

#[test]
fn an_unreadable_rule_file_keeps_its_io_error() {
    let path = PathBuf::from("/nonexistent/fusec-test.rules");
    let e = pipeline::rules(std::slice::from_ref(&path)).expect_err("no such file");
    assert!(e.is_input_error());
    let PipelineError::Io { path: p, source } = &e else {
        panic!("not an I/O error: {e:?}");
    };
    assert_eq!(p, &path);
    assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
    assert!(e.source().is_some(), "the io::Error is the source");
    assert_eq!(
        e.to_string(),
        format!("/nonexistent/fusec-test.rules: cannot read: {source}")
    );
}

#[test]
fn an_unknown_op_class_names_the_known_ones() {
    let e = "qkvz"
        .parse::<fusec::rewrite::precision::OpClass>()
        .expect_err("no such class");
    assert_eq!(
        e.to_string(),
        "unknown op class `qkvz` (expected one of qkv, attn-out, mlp-up, mlp-down, lm-head, kv-cache)"
    );
}
