//! fusec: a graph compiler for LLM decode steps.
//!
//! This crate is the command-line tool and a thin facade over the stage crates:
//! [`ir`] (the tensor IR), [`model`] (frontends, architectures and the eager graph)
//! and [`exec`] (the CPU executor). The [`pipeline`] module runs the stages in order for the CLI and the
//! tests.

pub use fusec_codegen as codegen;
pub use fusec_cuda as cuda;
pub use fusec_exec as exec;
pub use fusec_gguf as gguf;
pub use fusec_ir as ir;
pub use fusec_model as model;
pub use fusec_report as report;
pub use fusec_rewrite as rewrite;
pub use fusec_text as text;
pub use fusec_weights as weights;

pub mod bench;
pub mod explain;
pub mod memory;
pub mod output;
pub mod pipeline;
pub mod serving;
pub mod summary;
