//! Graph builders: the decode step of a model, op for op as an eager framework runs it.

mod builder;
mod llama;

pub use builder::{BuildError, Builder};
pub use llama::eager_decode_graph;
