//! fusec's CUDA runtime: what runs the text that `fusec-codegen` generates.
//!
//! - [`nvrtc`]: NVRTC, loaded at run time, to check and compile the generated source
//!   (the `fusec compile --emit ptx` path and the tests' check of every kernel);
//! - [`runtime`]: a [`runtime::Runner`] that executes a launch plan on any
//!   [`runtime::Device`] (a GPU, or the tests' CPU emulation of the kernels), and
//!   [`runtime::WeightSource`] with [`runtime::encode`] for the weights it uploads;
//! - `gpu` (feature `cuda`): the GPU executor, a [`runtime::Device`] over cudarc with
//!   the CUDA driver loaded at run time, and the executor's weights as a weight source.
//!
//! The crate sits after codegen and the CPU executor in the pipeline: codegen is pure
//! text generation and knows nothing of devices; the executor's `Weights` feed the GPU.
//! Without the `cuda` feature nothing here links against CUDA, and a missing NVRTC or
//! driver is a typed error, never a panic.

#[cfg(feature = "cuda")]
pub mod gpu;
pub mod nvrtc;
pub mod ptxas;
pub mod runtime;
