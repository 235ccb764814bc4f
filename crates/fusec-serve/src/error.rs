//! The errors of the engine, the scheduler and the server.

use std::net::SocketAddr;

/// An engine failed a call. The scheduler fails the requests of a failed step and
/// goes on with the others.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("no sequence {0}")]
    UnknownSequence(u64),
    #[error("sequence {0} is listed twice in one step")]
    Repeated(u64),
    #[error("sequence {seq}: asked to feed {asked} tokens, {queued} are queued")]
    NothingToFeed {
        seq: u64,
        asked: usize,
        queued: usize,
    },
    #[error("sequence {seq} would hold {positions} positions, beyond the context of {max}")]
    ContextFull {
        seq: u64,
        positions: usize,
        max: usize,
    },
    #[error("a step needs {needed} KV blocks, {free} are free")]
    OutOfBlocks { needed: usize, free: usize },
    #[error("token id {id} is out of range for the vocabulary of {vocab} tokens")]
    BadToken { id: u32, vocab: usize },
    #[error("sequence {seq}: logit {index} is {value}")]
    NonFinite { seq: u64, index: usize, value: f32 },
    /// An engine handed over a logits row not laid out in one slice (its own bug).
    #[error("sequence {0}: the logits row is not contiguous")]
    NonContiguous(u64),
    #[error(transparent)]
    Exec(#[from] fusec_exec::Error),
    #[error(transparent)]
    Paged(#[from] fusec_exec::PagedError),
}

/// A request the scheduler refuses when it is submitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("max_tokens must be at least 1")]
    NoTokens,
    #[error(
        "this model's maximum context length is {max} tokens; the request needs {needed} ({prompt} in the prompt, {max_tokens} to generate)"
    )]
    OverContext {
        needed: usize,
        prompt: usize,
        max_tokens: usize,
        max: usize,
    },
    #[error(
        "the request needs {needed} KV blocks ({positions} positions), more than the {total} the server has"
    )]
    OverCapacity {
        needed: usize,
        positions: usize,
        total: usize,
    },
    #[error("token id {id} is out of range for the vocabulary of {vocab} tokens")]
    BadToken { id: u32, vocab: usize },
    /// The sampling options are out of range (the message names the option).
    #[error("{0}")]
    Sampling(String),
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// The scheduler's settings are inconsistent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("scheduler settings: {0}")]
pub struct ConfigError(pub String);

/// The server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot start the model thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
}
