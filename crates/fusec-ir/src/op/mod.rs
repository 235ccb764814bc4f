//! The closed set of operations, shared by the IR graph and the rewrite e-graph.
//!
//! An [`Op`] is an operation together with its attributes (axis, shape, weight name…),
//! but without its operands: operands are edges of the graph, or children of an e-node.
//! Every op has exactly one textual form, its *token* (`reduce.mean{axis=2,keepdim=true}`),
//! used by the text IR, the rule files and the e-graph alike.
//!
//! - [`def`]: the enum and its attributes;
//! - [`table`]: the op table, one row per op name ([`OpKind`]): name, arity, operand
//!   roles, execution (leaf, view, folded, or a kernel of some class) and attribute
//!   keys. Every stage reads what an op is from here;
//! - `infer`, `infer_fused`: the type rules ([`Op::infer`]);
//! - [`parse`]: an op from its name and attributes;
//! - [`example`]: a minimal graph around each op kind, for tests that walk the table.

pub mod def;
pub mod example;
mod infer;
mod infer_fused;
pub mod parse;
pub mod table;

pub use def::{
    resolve_axis, Arity, Attr, AxisError, BinaryOp, FusedOp, InputKind, Op, OpParseError, ReduceOp,
    TypeError, UnaryOp, F64,
};
pub use infer::INT_BLOCK;
pub use parse::{kind_named, op_from_parts, OpPartsError};
pub use table::{op_names, Execution, KernelClass, OpInfo, OpKind, OperandRole};
