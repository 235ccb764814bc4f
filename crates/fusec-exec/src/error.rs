//! The executor's error type.

use crate::kernels::KernelError;

/// Everything that can go wrong when loading weights or running a graph.
///
/// Weight-file problems and bad run inputs are the user's ([`Error::is_input_error`]);
/// the rest mean the graph or the executor is at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading, making or binding weights failed.
    #[error(transparent)]
    Weights(#[from] fusec_weights::Error),
    #[error("input `{name}`: {message}")]
    BadInput { name: String, message: String },
    #[error("symbolic dimension `{0}` has no value")]
    Unbound(String),
    #[error("the graph is not executable: {0}")]
    InvalidGraph(String),
    #[error("%{node} = {op}: {source}")]
    Node {
        /// The value's number `%N` in the graph's text form.
        node: usize,
        op: String,
        #[source]
        source: KernelError,
    },
}

impl Error {
    /// Whether the error is the user's: a bad weight file or a bad run input (a token
    /// id outside the vocabulary included).
    pub fn is_input_error(&self) -> bool {
        match self {
            Error::Weights(e) => e.is_input_error(),
            Error::BadInput { .. } => true,
            Error::Node { source, .. } => source.is_input_error(),
            Error::InvalidGraph(_) | Error::Unbound(_) => false,
        }
    }
}
