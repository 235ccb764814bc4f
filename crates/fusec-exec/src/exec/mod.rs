//! The interpreter: runs a verified graph node by node and measures what it does.
//!
//! - `plan.rs`: [`Executor::new`], the plan (order, operand slots, last uses, bound
//!   leaves, the caches moved into their kernels);
//! - `packing.rs`: GEMV weights in compact storage, packed on huge pages;
//! - `run.rs`: a step ([`Executor::run_into`] and its wrappers), the slot table and
//!   the per-node bookkeeping;
//! - `dispatch.rs`: the one exhaustive match over `Op`, from operands to a kernel;
//! - `traffic.rs`: the bytes a launch reads and writes;
//! - `value.rs`: runtime values ([`Value`]), a step's outputs ([`RunOutput`]) and
//!   where its inputs come from ([`StepInputs`]).
//!
//! [`Executor::new`] plans the graph once: a topological order, operand slots, the
//! point after which each value is dead (so intermediates and the previous KV cache are
//! freed as soon as possible), and the leaves bound at load time (weights, RoPE
//! frequencies). [`Executor::run`] then evaluates one step under given [`Bindings`](fusec_ir::shape::Bindings).
//!
//! The measurements come from the runtime tensors, not from `fusec_ir::cost`: a node
//! counts as a launch when its kernel runs; it writes its result's bytes, and reads each
//! operand's bytes through its view (the smaller of the view's and its buffer's size;
//! nothing for a scalar kernel argument; the gathered rows for an embedding table; the
//! stored FP8 values and the scales of a quantized weight). A KV append in place
//! (`kv.append`, `fused.decode_attention`) reads none of the cached entries it appends
//! to and writes only the new ones; if it had to copy a cache to make room, the copy
//! is counted too.
//!
//! **Ownership of the KV cache.** An append may write into a cache's buffer only if no
//! other tensor shares it. So the executor takes its inputs by value, and when a node
//! that appends in place is the last user of a cache, the cache is moved out of its
//! slot and handed to the kernel, which finds the buffer unshared. Input values are
//! kept until the end of the step (the append does not change what they show), so that
//! [`Executor::run_restoring`] can hand them back to the caller when a step fails.
//!
//! **Allocation.** A steady-state step allocates nothing on the heap.
//! [`Executor::run_into`] writes into a [`RunOutput`] that the caller keeps from step
//! to step, whose output list and per-node statistics keep their capacity; output
//! names are shared `Arc<str>`s; the inputs are taken out of the caller's container
//! ([`StepInputs`]) without touching its keys. The slot table and the per-node operand
//! lists live in the executor; tensor headers are inline ([`crate::tensor::Dims`]);
//! kernel buffers, their `Arc`s and the lists of multi-result kernels come from the
//! per-thread pool (`crate::pool`), and every value a step drops goes back to it.
//! Strings are only built on the error path. The test `tests/step_alloc.rs` counts
//! every allocation of steady-state steps.

mod check;
mod dispatch;
mod executor;
mod packing;
mod plan;
mod run;
mod traffic;
mod value;

pub use executor::Executor;
pub(crate) use plan::dims;
pub(crate) use value::recycle;
pub use value::{RunOutput, StepInputs, Value};
