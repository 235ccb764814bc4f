//! fusec's CPU executor: runs a verified fusec graph on the weights of `fusec_weights`
//! (a checkpoint or random), binding them without a copy.
//!
//! - [`tensor`]: CPU tensors (shared storage, shape, strides, offset), so that views are
//!   free as in PyTorch, readable as `ndarray` views ([`Tensor::view_f32`]); `dims`:
//!   shapes and strides held inline; [`rounding`] (from `fusec_weights`): rounding of
//!   values to their IR dtype and the compact codes;
//! - [`kernels`]: reference CPU kernels, one module per op family; `kernels::dot` is
//!   the one summation order that every dot product follows;
//! - [`exec`]: the interpreter (planning, packing, running, dispatch, traffic
//!   accounting), which measures launches, bytes and time per node;
//! - [`decode`]: a greedy-decoding [`Session`] that carries the KV cache across steps,
//!   with logits as `ndarray` arrays;
//! - [`paged`]: a [`PagedSession`] decoding a ragged batch over a paged KV cache,
//!   sequences joining and leaving between steps;
//! - [`calibrate`]: the KV-cache scales of an FP8 graph, calibrated by a run;
//!   [`accuracy`]: logits of a lowered run against a reference run;
//! - [`team`]: how kernels split work across cores; [`hugepages`] and `pack`:
//!   weights packed end to end on 2 MiB pages;
//! - [`profile`]: per-op-kind totals of the measured counts; `pool`: reused buffers,
//!   `recycle`: dropped values back to the pool.
//!
//! Invariant: every launching node's measured launches and bytes equal the prediction
//! of `fusec_ir::cost` for the same graph and bindings, but they are computed from the
//! runtime tensors, never from the cost model.
//!
//! **Why the kernels walk their own views.** The public API speaks `ndarray`
//! (weights, tensor views, logits), and the tests' references are written with it,
//! but the kernels keep the hand-written strided views of [`tensor`], for three
//! measured reasons (`cargo bench -p fusec-exec --bench views`): a view of rank 5 (the
//! grouped-query `expand` of every GQA decode graph) allocates twice in `ndarray`
//! (`IxDyn` holds four axes inline), which would break the zero-allocation step; the
//! strided copy of a transposed KV-cache view is about 4x slower through `ndarray`'s
//! `Zip` than the row copies of [`tensor`]; and pooled output buffers and compact
//! `u8`/`u16` storage would need adapters around every `ndarray` loop anyway.

pub mod accuracy;
pub mod calibrate;
pub mod cputime;
pub mod decode;
mod dims;
mod error;
pub mod exec;
pub mod hugepages;
pub mod kernels;
mod pack;
pub mod paged;
mod pool;
pub mod prefill;
pub mod profile;
mod recycle;
pub mod team;
pub mod tensor;

/// Rounding to IR dtypes and the compact codes, shared with the weights.
pub use fusec_weights::rounding;

/// The array types of the public API (weights, tensor views, logits).
pub use ndarray;

pub use decode::{Generation, Session, StepOutput};
pub use error::Error;
pub use exec::{Executor, RunOutput, Value};
pub use fusec_weights::{SplitMix64, WeightSource, WeightTensor, Weights};
pub use kernels::KernelError;
pub use paged::{PagedConfig, PagedError, PagedSession, PagedStep, SeqId, SeqOutput};
pub use prefill::{Prefill, PrefillOutput, PrefillStats, PromptFed};
pub use profile::{KindStats, NodeStats, Profile, StepStats};
pub use tensor::{Tensor, TensorError};
