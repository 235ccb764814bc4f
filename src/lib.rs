//! fusec: a graph compiler for LLM decode steps.
//!
//! This crate is the command-line tool and a thin facade over the stage crates:
//! [`ir`] (the tensor IR, frontends and the eager graph). The [`pipeline`] module runs
//! the stages in order for the CLI and the tests.

pub use fusec_ir as ir;

pub mod pipeline;
pub mod summary;
