//! The backend's error type.

/// Why a graph could not be lowered to CUDA.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The graph fails the IR verifier or has a cycle: a bug upstream.
    #[error("the graph is not valid: {0}")]
    InvalidGraph(String),
    /// A symbol other than the batch `B` and the cached length `S`.
    #[error("symbolic dimension `{0}` has no value: only B (baked in) and S (a kernel argument) are supported")]
    UnknownSymbol(String),
    /// The options are inconsistent.
    #[error("bad codegen options: {0}")]
    Options(String),
    /// A dtype the backend has no kernels for yet: a limit of the backend that the
    /// user's choice of precision meets, not a bug.
    #[error("%{value} = {op}: {dtype} has no CUDA kernels yet: emit CUDA for bf16, f16, f32 or fp8, or run {dtype} on the CPU (`fusec run`)")]
    NoKernels {
        value: usize,
        op: String,
        dtype: String,
    },
    /// A prefill step (`T > 1` tokens per sequence) needs a kernel the backend has only
    /// for decode: a limit of the backend that the user's choice meets, not a bug.
    #[error("%{value} = {op}: {what} have no CUDA prefill kernels yet: compile the decode step alone, or prefill on the CPU (`fusec run --prefill-chunk`)")]
    NoPrefillKernels {
        value: usize,
        op: String,
        what: String,
    },
    /// A node the backend cannot lower, with the reason; `value` is its `%N` in the
    /// canonical text form.
    #[error("%{value} = {op}: {message}")]
    Unsupported {
        value: usize,
        op: String,
        message: String,
    },
}
