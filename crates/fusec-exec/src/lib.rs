//! fusec's CPU executor: runs a verified fusec graph on real or random weights.
//!
//! - [`tensor`]: CPU tensors (shared storage, shape, strides, offset), so that views are
//!   free as in PyTorch; [`dtype`]: rounding of values to their IR dtype;
//! - [`weights`]: safetensors checkpoints by memory map, checked against the graph;
//!   [`random`]: seeded random weights with a documented distribution;
//! - [`kernels`]: reference CPU kernels, one module per op family;
//! - [`exec`]: the interpreter, which measures launches, bytes and time per node;
//! - [`decode`]: a greedy-decoding [`Session`] that carries the KV cache across steps;
//! - [`team`]: how kernels split work across cores; [`hugepages`] and `pack`:
//!   weights packed end to end on 2 MiB pages;
//! - [`profile`]: per-op-kind totals of the measured counts; `pool`: reused buffers;
//! - [`quant`]: FP8 weights made at load, calibrated KV-cache scales, saving;
//!   [`accuracy`]: logits of a lowered run against a reference run.
//!
//! Invariant: every launching node's measured launches and bytes equal the prediction
//! of `fusec_ir::cost` for the same graph and bindings, but they are computed from the
//! runtime tensors, never from the cost model.

pub mod accuracy;
pub mod calibrate;
pub mod decode;
mod dims;
mod error;
pub mod exec;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod hugepages;
pub mod kernels;
mod pack;
mod pool;
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
pub use profile::{KindStats, NodeStats, Profile, StepStats};
pub use tensor::{Tensor, TensorError};
