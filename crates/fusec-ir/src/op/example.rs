//! A minimal well-typed graph around each op kind, for tests that walk the op table
//! through every stage (`tests/op_table.rs` in the `fusec` package).
//!
//! The match over [`OpKind`] is exhaustive, so a new row of the table does not compile
//! until it has an example here, and then every stage's test runs it. Operands are data
//! inputs (f32 unless the op needs otherwise; `i32` ids), weights and scalars; caches
//! are `state` inputs of `[1, KV, S, hd]` returned as state outputs, so the examples
//! have the decode step's symbol `S` ([`crate::step::PAST`]) and a batch of 1.

use super::def::{BinaryOp, FusedOp, InputKind, Op, ReduceOp, UnaryOp, F64};
use super::table::OpKind;
use crate::dtype::DType;
use crate::graph::{Graph, NodeId, OutputKind};
use crate::op::TypeError;
use crate::shape::{Dim, Shape};
use crate::step;
use crate::types::TensorType;

/// Builds the example graph step by step.
struct Ex {
    g: Graph,
}

type R<T> = Result<T, TypeError>;

fn fixed(dims: &[u64]) -> Shape {
    Shape::fixed(dims)
}

/// `[1, kv, S + plus, hd]`.
fn cache_shape(kv: u64, plus: u64, hd: u64) -> Shape {
    Shape(vec![
        Dim::Fixed(1),
        Dim::Fixed(kv),
        Dim::sym(step::PAST).plus(plus),
        Dim::Fixed(hd),
    ])
}

impl Ex {
    fn input(&mut self, name: &str, dtype: DType, shape: Shape) -> R<NodeId> {
        self.g.add_leaf(
            Op::Input {
                name: name.into(),
                kind: InputKind::Data,
            },
            TensorType::new(dtype, shape),
        )
    }
    fn x(&mut self, name: &str, dims: &[u64]) -> R<NodeId> {
        self.input(name, DType::F32, fixed(dims))
    }
    fn state(&mut self, name: &str, shape: Shape) -> R<NodeId> {
        self.g.add_leaf(
            Op::Input {
                name: name.into(),
                kind: InputKind::State,
            },
            TensorType::new(DType::F32, shape),
        )
    }
    fn weight(&mut self, name: &str, dtype: DType, dims: &[u64]) -> R<NodeId> {
        self.g.add_leaf(
            Op::Weight { name: name.into() },
            TensorType::new(dtype, fixed(dims)),
        )
    }
    fn scalar(&mut self, value: f64) -> R<NodeId> {
        self.g.add(Op::Scalar { value: F64(value) }, &[])
    }
    fn op(&mut self, op: Op, operands: &[NodeId]) -> R<NodeId> {
        self.g.add(op, operands)
    }
    fn out(mut self, value: NodeId) -> Graph {
        self.g.add_output("out", OutputKind::Data, value);
        self.g
    }
    /// An attention's `(out, keys, values)` tuple `t` as the graph's outputs, in the
    /// order extraction gives them back: the state outputs first.
    fn attention_out(mut self, t: NodeId) -> R<Graph> {
        let k_all = self.op(Op::Get { index: 1 }, &[t])?;
        let v_all = self.op(Op::Get { index: 2 }, &[t])?;
        let out = self.op(Op::Get { index: 0 }, &[t])?;
        self.g.add_output("past.0.key", OutputKind::State, k_all);
        self.g.add_output("past.0.value", OutputKind::State, v_all);
        Ok(self.out(out))
    }
    fn unary(mut self, u: UnaryOp) -> R<Graph> {
        let x = self.x("x", &[2, 8])?;
        let y = self.op(Op::Unary(u), &[x])?;
        Ok(self.out(y))
    }
    fn binary(mut self, b: BinaryOp) -> R<Graph> {
        let x = self.x("x", &[2, 8])?;
        let y = self.x("y", &[2, 8])?;
        let z = self.op(Op::Binary(b), &[x, y])?;
        Ok(self.out(z))
    }
    fn reduce(mut self, kind: ReduceOp) -> R<Graph> {
        let x = self.x("x", &[2, 8])?;
        let y = self.op(
            Op::Reduce {
                kind,
                axis: -1,
                keepdim: true,
            },
            &[x],
        )?;
        Ok(self.out(y))
    }
    fn view(mut self, op: Op, dims: &[u64]) -> R<Graph> {
        let x = self.x("x", dims)?;
        let y = self.op(op, &[x])?;
        Ok(self.out(y))
    }
    /// `x [1,1,8]`, a norm weight `[8]` and `eps`.
    fn norm_operands(&mut self) -> R<[NodeId; 3]> {
        Ok([
            self.x("x", &[1, 1, 8])?,
            self.weight("norm", DType::F32, &[8])?,
            self.scalar(1e-5)?,
        ])
    }
    /// GEMV weights `w0 .. wn` of `[6, 8]`.
    fn gemv_weights(&mut self, n: usize) -> R<Vec<NodeId>> {
        (0..n)
            .map(|i| self.weight(&format!("w{i}"), DType::F32, &[6, 8]))
            .collect()
    }
}

/// A graph whose output `out` is computed by an op of kind `kind` (and, where the op
/// needs them, by the leaves and views that feed it).
pub fn graph(kind: OpKind) -> Result<Graph, TypeError> {
    let mut e = Ex {
        g: Graph::new(format!("example-{}", kind.info().name)),
    };
    Ok(match kind {
        OpKind::Input => {
            let x = e.x("x", &[2, 3])?;
            e.out(x)
        }
        OpKind::State => {
            let c = e.state("c", fixed(&[2, 3]))?;
            let y = e.op(Op::Unary(UnaryOp::Neg), &[c])?;
            e.g.add_output("c", OutputKind::State, y);
            e.g
        }
        OpKind::Weight => {
            let x = e.x("x", &[1, 3])?;
            let w = e.weight("w", DType::F32, &[1, 3])?;
            let y = e.op(Op::Binary(BinaryOp::Add), &[x, w])?;
            e.out(y)
        }
        OpKind::Scalar => {
            let x = e.x("x", &[2, 3])?;
            let s = e.scalar(2.0)?;
            let y = e.op(Op::Binary(BinaryOp::Mul), &[x, s])?;
            e.out(y)
        }
        OpKind::RopeInvFreq => {
            let f = e.op(
                Op::RopeInvFreq {
                    theta: F64(10000.0),
                    head_dim: 8,
                },
                &[],
            )?;
            let y = e.op(Op::Unary(UnaryOp::Cos), &[f])?;
            e.out(y)
        }
        OpKind::RopeInvFreqLlama3 => {
            let f = e.op(
                Op::RopeInvFreqLlama3 {
                    theta: F64(500000.0),
                    head_dim: 8,
                    factor: F64(8.0),
                    low_freq_factor: F64(1.0),
                    high_freq_factor: F64(4.0),
                    original_max_position_embeddings: 16,
                },
                &[],
            )?;
            let y = e.op(Op::Unary(UnaryOp::Cos), &[f])?;
            e.out(y)
        }
        OpKind::UnaryNeg => e.unary(UnaryOp::Neg)?,
        OpKind::UnaryRsqrt => e.unary(UnaryOp::Rsqrt)?,
        OpKind::UnarySqrt => e.unary(UnaryOp::Sqrt)?,
        OpKind::UnaryExp => e.unary(UnaryOp::Exp)?,
        OpKind::UnarySilu => e.unary(UnaryOp::Silu)?,
        OpKind::UnaryTanh => e.unary(UnaryOp::Tanh)?,
        OpKind::UnaryGeluTanh => e.unary(UnaryOp::GeluTanh)?,
        OpKind::UnaryCos => e.unary(UnaryOp::Cos)?,
        OpKind::UnarySin => e.unary(UnaryOp::Sin)?,
        OpKind::BinaryAdd => e.binary(BinaryOp::Add)?,
        OpKind::BinarySub => e.binary(BinaryOp::Sub)?,
        OpKind::BinaryMul => e.binary(BinaryOp::Mul)?,
        OpKind::BinaryDiv => e.binary(BinaryOp::Div)?,
        OpKind::BinaryPow => e.binary(BinaryOp::Pow)?,
        OpKind::Cast => e.view(Op::Cast { to: DType::Bf16 }, &[2, 8])?,
        OpKind::ReduceSum => e.reduce(ReduceOp::Sum)?,
        OpKind::ReduceMean => e.reduce(ReduceOp::Mean)?,
        OpKind::ReduceMax => e.reduce(ReduceOp::Max)?,
        OpKind::Argmax => e.view(Op::Argmax { axis: -1 }, &[2, 8])?,
        OpKind::Softmax => e.view(Op::Softmax { axis: -1 }, &[2, 8])?,
        OpKind::MatMul => {
            let a = e.x("a", &[1, 2, 3, 4])?;
            let b = e.x("b", &[1, 2, 4, 5])?;
            let y = e.op(Op::MatMul, &[a, b])?;
            e.out(y)
        }
        OpKind::Linear => {
            let x = e.x("x", &[1, 1, 8])?;
            let w = e.weight("w", DType::F32, &[6, 8])?;
            let y = e.op(Op::Linear, &[x, w])?;
            e.out(y)
        }
        OpKind::Embedding => {
            let table = e.weight("table", DType::F32, &[16, 8])?;
            let ids = e.input("ids", DType::I32, fixed(&[1, 1]))?;
            let y = e.op(Op::Embedding, &[table, ids])?;
            e.out(y)
        }
        OpKind::Cat => {
            let x = e.x("x", &[2, 3])?;
            let y = e.x("y", &[2, 5])?;
            let z = e.op(Op::Cat { axis: -1 }, &[x, y])?;
            e.out(z)
        }
        OpKind::Copy => {
            let x = e.x("x", &[2, 3])?;
            let t = e.op(Op::Transpose { a: 0, b: 1 }, &[x])?;
            let y = e.op(Op::Copy, &[t])?;
            e.out(y)
        }
        OpKind::Reshape => e.view(
            Op::Reshape {
                shape: fixed(&[3, 4]),
            },
            &[2, 6],
        )?,
        OpKind::Transpose => e.view(Op::Transpose { a: 0, b: 1 }, &[2, 3])?,
        OpKind::Slice => e.view(
            Op::Slice {
                axis: -1,
                start: 1,
                end: 3,
            },
            &[2, 4],
        )?,
        OpKind::Unsqueeze => e.view(Op::Unsqueeze { axis: 0 }, &[2, 3])?,
        OpKind::Expand => e.view(
            Op::Expand {
                shape: fixed(&[4, 3]),
            },
            &[1, 3],
        )?,
        OpKind::Get => {
            let [x, w, eps] = e.norm_operands()?;
            let ws = e.gemv_weights(2)?;
            let t = e.op(
                Op::Fused(FusedOp::RmsNormLinear),
                &[x, w, eps, ws[0], ws[1]],
            )?;
            let y = e.op(Op::Get { index: 1 }, &[t])?;
            e.out(y)
        }
        OpKind::Dequant => {
            let x = e.x("x", &[1, 1, 8])?;
            let q = e.weight("w.fp8", DType::Fp8E4M3, &[6, 8])?;
            let s = e.weight("w.scale", DType::F32, &[6])?;
            let w = e.op(
                Op::Dequant {
                    to: DType::F32,
                    act: DType::Fp8E4M3,
                },
                &[q, s],
            )?;
            let y = e.op(Op::Linear, &[x, w])?;
            e.out(y)
        }
        OpKind::KvAppend => {
            let past = e.state("past", cache_shape(2, 0, 4))?;
            let new = e.input("new", DType::F32, cache_new(2, 4))?;
            let all = e.op(Op::Fused(FusedOp::KvAppend), &[past, new])?;
            e.g.add_output("past", OutputKind::State, all);
            e.g
        }
        OpKind::Rope => {
            let x = e.x("x", &[1, 2, 1, 8])?;
            let cos = e.x("cos", &[1, 1, 1, 8])?;
            let sin = e.x("sin", &[1, 1, 1, 8])?;
            let y = e.op(Op::Fused(FusedOp::Rope), &[x, cos, sin])?;
            e.out(y)
        }
        OpKind::RmsNorm => {
            let [x, w, eps] = e.norm_operands()?;
            let y = e.op(Op::Fused(FusedOp::RmsNorm), &[x, w, eps])?;
            e.out(y)
        }
        OpKind::RmsNormLinear => {
            let [x, w, eps] = e.norm_operands()?;
            let ws = e.gemv_weights(1)?;
            let y = e.op(Op::Fused(FusedOp::RmsNormLinear), &[x, w, eps, ws[0]])?;
            e.out(y)
        }
        OpKind::OffsetRmsNormLinear => {
            let [x, w, eps] = e.norm_operands()?;
            let c = e.scalar(1.0)?;
            let ws = e.gemv_weights(2)?;
            let t = e.op(
                Op::Fused(FusedOp::OffsetRmsNormLinear),
                &[x, w, eps, c, ws[0], ws[1]],
            )?;
            let y = e.op(Op::Get { index: 0 }, &[t])?;
            e.out(y)
        }
        OpKind::OffsetRmsNormGeglu => {
            let [x, w, eps] = e.norm_operands()?;
            let c = e.scalar(1.0)?;
            let ws = e.gemv_weights(2)?;
            let y = e.op(
                Op::Fused(FusedOp::OffsetRmsNormGeglu),
                &[x, w, eps, c, ws[0], ws[1]],
            )?;
            e.out(y)
        }
        OpKind::Swiglu => {
            let x = e.x("x", &[1, 1, 8])?;
            let ws = e.gemv_weights(2)?;
            let y = e.op(Op::Fused(FusedOp::Swiglu), &[x, ws[0], ws[1]])?;
            e.out(y)
        }
        OpKind::Geglu => {
            let x = e.x("x", &[1, 1, 8])?;
            let ws = e.gemv_weights(2)?;
            let y = e.op(Op::Fused(FusedOp::Geglu), &[x, ws[0], ws[1]])?;
            e.out(y)
        }
        OpKind::RmsNormSwiglu => {
            let [x, w, eps] = e.norm_operands()?;
            let ws = e.gemv_weights(2)?;
            let y = e.op(
                Op::Fused(FusedOp::RmsNormSwiglu),
                &[x, w, eps, ws[0], ws[1]],
            )?;
            e.out(y)
        }
        OpKind::LinearAdd => {
            let x = e.x("x", &[1, 1, 8])?;
            let ws = e.gemv_weights(1)?;
            let r = e.x("r", &[1, 1, 6])?;
            let y = e.op(Op::Fused(FusedOp::LinearAdd), &[x, ws[0], r])?;
            e.out(y)
        }
        OpKind::MultiLinear => {
            let x = e.x("x", &[1, 1, 8])?;
            let ws = e.gemv_weights(3)?;
            let t = e.op(Op::Fused(FusedOp::MultiLinear), &[x, ws[0], ws[1], ws[2]])?;
            let k = e.op(Op::Get { index: 1 }, &[t])?;
            let v = e.op(Op::Get { index: 2 }, &[t])?;
            let q = e.op(Op::Get { index: 0 }, &[t])?;
            e.g.add_output("k", OutputKind::Data, k);
            e.g.add_output("v", OutputKind::Data, v);
            e.out(q)
        }
        OpKind::LinearPostRmsNorm => {
            let x = e.x("x", &[1, 1, 8])?;
            let ws = e.gemv_weights(1)?;
            let w = e.weight("norm", DType::F32, &[6])?;
            let eps = e.scalar(1e-6)?;
            let r = e.x("r", &[1, 1, 6])?;
            let y = e.op(
                Op::Fused(FusedOp::LinearPostRmsNorm),
                &[x, ws[0], w, eps, r],
            )?;
            e.out(y)
        }
        OpKind::LinearOffsetRmsNorm => {
            let x = e.x("x", &[1, 1, 8])?;
            let ws = e.gemv_weights(1)?;
            let w = e.weight("norm", DType::F32, &[6])?;
            let eps = e.scalar(1e-6)?;
            let c = e.scalar(1.0)?;
            let r = e.x("r", &[1, 1, 6])?;
            let y = e.op(
                Op::Fused(FusedOp::LinearOffsetRmsNorm),
                &[x, ws[0], w, eps, c, r],
            )?;
            e.out(y)
        }
        OpKind::PostRmsNorm => {
            let [x, w, eps] = e.norm_operands()?;
            let r = e.x("r", &[1, 1, 8])?;
            let y = e.op(Op::Fused(FusedOp::PostRmsNorm), &[x, w, eps, r])?;
            e.out(y)
        }
        OpKind::OffsetRmsNorm => {
            let [x, w, eps] = e.norm_operands()?;
            let c = e.scalar(1.0)?;
            let r = e.x("r", &[1, 1, 8])?;
            let y = e.op(Op::Fused(FusedOp::OffsetRmsNorm), &[x, w, eps, c, r])?;
            e.out(y)
        }
        OpKind::LinearScaleAdd => {
            let x = e.x("x", &[1, 1, 8])?;
            let ws = e.gemv_weights(1)?;
            let c = e.scalar(0.22)?;
            let r = e.x("r", &[1, 1, 6])?;
            let y = e.op(Op::Fused(FusedOp::LinearScaleAdd), &[x, ws[0], c, r])?;
            e.out(y)
        }
        OpKind::Attention => {
            let q = e.x("q", &[1, 4, 1, 8])?;
            let k = e.x("k", &[1, 2, 5, 8])?;
            let v = e.x("v", &[1, 2, 5, 8])?;
            let scale = e.scalar(0.125f64.sqrt())?;
            let mask = e.x("mask", &[1, 1, 1, 5])?;
            let y = e.op(Op::Fused(FusedOp::Attention), &[q, k, v, scale, mask])?;
            e.out(y)
        }
        OpKind::DecodeAttention => {
            let q = e.x("q", &[1, 4, 1, 8])?;
            let k = e.input("k", DType::F32, cache_new(2, 8))?;
            let v = e.input("v", DType::F32, cache_new(2, 8))?;
            let cos = e.x("cos", &[1, 1, 1, 8])?;
            let sin = e.x("sin", &[1, 1, 1, 8])?;
            let past_k = e.state("past.0.key", cache_shape(2, 0, 8))?;
            let past_v = e.state("past.0.value", cache_shape(2, 0, 8))?;
            let scale = e.scalar(0.125f64.sqrt())?;
            let mask = e.input(
                "mask",
                DType::F32,
                Shape(vec![
                    Dim::Fixed(1),
                    Dim::Fixed(1),
                    Dim::Fixed(1),
                    Dim::sym(step::PAST).plus(1),
                ]),
            )?;
            let t = e.op(
                Op::Fused(FusedOp::DecodeAttention),
                &[q, k, v, cos, sin, past_k, past_v, scale, mask],
            )?;
            e.attention_out(t)?
        }
        OpKind::DecodeAttentionCapped => {
            let q = e.x("q", &[1, 4, 1, 8])?;
            let k = e.input("k", DType::F32, cache_new(2, 8))?;
            let v = e.input("v", DType::F32, cache_new(2, 8))?;
            let cos = e.x("cos", &[1, 1, 1, 8])?;
            let sin = e.x("sin", &[1, 1, 1, 8])?;
            let past_k = e.state("past.0.key", cache_shape(2, 0, 8))?;
            let past_v = e.state("past.0.value", cache_shape(2, 0, 8))?;
            let scale = e.scalar(0.125f64.sqrt())?;
            let mask = e.input(
                "mask",
                DType::F32,
                Shape(vec![
                    Dim::Fixed(1),
                    Dim::Fixed(1),
                    Dim::Fixed(1),
                    Dim::sym(step::PAST).plus(1),
                ]),
            )?;
            let cap = e.scalar(50.0)?;
            let t = e.op(
                Op::Fused(FusedOp::DecodeAttentionCapped),
                &[q, k, v, cos, sin, past_k, past_v, scale, mask, cap],
            )?;
            e.attention_out(t)?
        }
        OpKind::PagedDecodeAttention => {
            let q = e.x("q", &[2, 4, 1, 8])?;
            let k = e.x("k", &[2, 2, 1, 8])?;
            let v = e.x("v", &[2, 2, 1, 8])?;
            let cos = e.x("cos", &[2, 1, 1, 8])?;
            let sin = e.x("sin", &[2, 1, 1, 8])?;
            let pool = fixed(&[3, 2, 4, 8]);
            let pool_k = e.state("past.0.key", pool.clone())?;
            let pool_v = e.state("past.0.value", pool)?;
            let table = e.input(step::BLOCK_TABLE, DType::I32, fixed(&[2, 2]))?;
            let positions = e.input(step::POSITION_IDS, DType::I32, fixed(&[2, 1]))?;
            let scale = e.scalar(0.125f64.sqrt())?;
            let window = e.scalar(6.0)?;
            let t = e.op(
                Op::Fused(FusedOp::PagedDecodeAttention),
                &[
                    q, k, v, cos, sin, pool_k, pool_v, table, positions, scale, window,
                ],
            )?;
            e.attention_out(t)?
        }
        OpKind::PagedAttention => {
            // Two sequences, a pool of 3 blocks of 4 positions, tables of 2 blocks.
            let q = e.x("q", &[2, 4, 1, 8])?;
            let k = e.x("k", &[2, 2, 1, 8])?;
            let v = e.x("v", &[2, 2, 1, 8])?;
            let pool = fixed(&[3, 2, 4, 8]);
            let pool_k = e.state("past.0.key", pool.clone())?;
            let pool_v = e.state("past.0.value", pool)?;
            let table = e.input(step::BLOCK_TABLE, DType::I32, fixed(&[2, 2]))?;
            let positions = e.input(step::POSITION_IDS, DType::I32, fixed(&[2, 1]))?;
            let scale = e.scalar(0.125f64.sqrt())?;
            let t = e.op(
                Op::Fused(FusedOp::PagedAttention),
                &[q, k, v, pool_k, pool_v, table, positions, scale],
            )?;
            e.attention_out(t)?
        }
    })
}

/// `[1, kv, 1, hd]`: one new position.
fn cache_new(kv: u64, hd: u64) -> Shape {
    fixed(&[1, kv, 1, hd])
}
