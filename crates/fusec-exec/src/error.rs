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
    /// The logits of a step hold an infinity or a NaN (a weight so large that a
    /// product overflows, say): no token can be chosen from them.
    #[error("decode step {step} (generated token {token}, sequence {sequence}): logit {index} is {value}, not a finite number")]
    NonFiniteLogits {
        /// The graph run, counted from 1.
        step: u64,
        token: usize,
        sequence: usize,
        index: usize,
        value: f32,
    },
    /// With the executor's finiteness check on: the first infinity or NaN of a decode,
    /// the node that produced it and the step (counted from 1).
    #[error("decode step {step}: %{node} = {op}: element {index} of its result is {value}, not a finite number")]
    NonFiniteValue {
        step: u64,
        node: usize,
        op: String,
        index: usize,
        value: f32,
    },
    /// The kernel's error is part of the message (not a `source`), so that a chain
    /// printed with `{:#}` does not repeat it.
    #[error("%{node} = {op}: {kernel}")]
    Node {
        /// The value's number `%N` in the graph's text form.
        node: usize,
        op: String,
        kernel: KernelError,
    },
}

impl Error {
    /// Whether the error is the user's: a bad weight file or a bad run input (a token
    /// id outside the vocabulary included).
    pub fn is_input_error(&self) -> bool {
        match self {
            Error::Weights(e) => e.is_input_error(),
            Error::BadInput { .. }
            | Error::NonFiniteLogits { .. }
            | Error::NonFiniteValue { .. } => true,
            Error::Node { kernel, .. } => kernel.is_input_error(),
            Error::InvalidGraph(_) | Error::Unbound(_) => false,
        }
    }
}
