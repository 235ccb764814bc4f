//! fusec's intermediate representation.
//!
//! - [`dtype`], [`shape`], [`types`]: element types, symbolic shapes, value types;
//! - [`op`]: the closed op enum shared with the rewrite e-graph, with type inference;
//! - [`graph`]: the typed tensor graph on petgraph;
//! - [`verify`]: the invariants checked after every phase;
//! - [`text`]: the canonical text form and its parser; [`dot`]: Graphviz export;
//! - [`cost`]: launches, bytes and FLOPs per node, and the memory floor;
//! - [`step`]: the decode step's interface (input, state and output names, symbols);
//! - [`role`]: what each weight is in the model, as its builder recorded it;
//! - [`hardware`]: the target GPUs the cost model knows;
//! - [`quant`]: the integer block formats of quantized weights.
//!
//! Model frontends and graph builders live in `fusec-model`, on top of this crate.

pub mod cost;
pub mod dot;
pub mod dtype;
pub mod graph;
pub mod hardware;
pub mod numerics;
pub mod op;
pub mod quant;
pub mod role;
pub mod rope;
pub mod shape;
pub mod step;
pub mod text;
pub mod types;
pub mod verify;

pub use dtype::DType;
pub use graph::{Graph, Node, NodeId, Output, OutputKind, Provenance};
pub use op::{
    BinaryOp, FusedOp, InputKind, KernelClass, Op, OpKind, OperandRole, ReduceOp, UnaryOp, F64,
};
pub use role::WeightRole;
pub use shape::{Bindings, Dim, Shape};
pub use types::{TensorType, Type};
pub use verify::{verify, VerifyError, Violations};
