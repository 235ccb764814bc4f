//! fusec's code generator: pure text generation, graph to CUDA source and launch plan.
//!
//! [`generate`] lowers a verified decode-step graph to CUDA C, one kernel per
//! launching node (eager primitives and fused ops alike), and a [`LaunchPlan`]: the
//! buffers with their sizes and the kernels in order with grids, blocks, shared memory
//! and arguments. The backend has naga's shape: [`Options`], an [`Error`] enum, and
//! one entry point.
//!
//! - [`options`]: targets, tuning knobs, and the [`DecodeShape`] kernels are built for;
//! - [`layout`]: static views, so views cost nothing at run time;
//! - [`plan`]: the launch plan (serde);
//! - `emit`: the interface between the backend-neutral lowering (`lower`: buffers,
//!   in-place aliases, views, arena, deduplication by text, the launch plan) and a
//!   backend's `KernelEmitter`, one method per kernel family;
//! - [`cuda`]: the CUDA C emitter, one module per kernel family;
//!
//! Compiling and running the output (NVRTC, the plan runner, the GPU executor) is
//! `fusec-cuda`'s: this crate depends on the IR only.
//!
//! Invariant: the output is a pure function of its inputs. The same graph, shape and
//! options give byte-identical source and plan; kernels with identical text (the
//! layers of a model) are emitted once.

pub mod cuda;
mod emit;
mod error;
pub mod layout;
mod lower;
pub mod options;
mod output;
pub mod plan;

pub use error::Error;
pub use lower::generate;
pub use options::{Arch, DecodeShape, Options, PagedShape};
pub use output::{Kernel, Output};
pub use plan::LaunchPlan;
