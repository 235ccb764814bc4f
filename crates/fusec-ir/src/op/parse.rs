//! Ops from their parts: a name looked up in the op table, and attribute values.
//! The token syntax itself (`name{key=value}@weight`) is scanned by
//! [`crate::text::token`], which calls [`op_from_parts`].

use std::collections::BTreeMap;

use super::def::{Attr, BinaryOp, FusedOp, InputKind, Op, ReduceOp, UnaryOp, F64};
use super::table::OpKind;
use crate::shape::Shape;

/// Why a name and attributes make no op.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpPartsError {
    #[error("unknown op `{0}`")]
    UnknownOp(String),
    #[error("`{op}` needs attribute `{key}`")]
    MissingAttr { op: &'static str, key: &'static str },
    #[error("`{op}` has no attribute `{key}`")]
    UnknownAttr { op: &'static str, key: String },
    #[error("attribute `{key}` must be {expected}, got {got}")]
    AttrType {
        key: &'static str,
        expected: &'static str,
        got: String,
    },
    #[error("only `weight` takes an @name, not `{0}`")]
    NameOnNonWeight(String),
    #[error("`weight` needs a name: weight@model.layers.0...")]
    WeightWithoutName,
}

type R<T> = Result<T, OpPartsError>;

fn wrong(key: &'static str, expected: &'static str, got: Attr) -> OpPartsError {
    OpPartsError::AttrType {
        key,
        expected,
        got: got.to_string(),
    }
}

/// The attributes of one token, taken by key as the op's constructor needs them.
struct Attrs {
    op: &'static str,
    map: BTreeMap<String, Attr>,
}

impl Attrs {
    fn take(&mut self, key: &'static str) -> R<Attr> {
        self.map
            .remove(key)
            .ok_or(OpPartsError::MissingAttr { op: self.op, key })
    }
    fn i64(&mut self, key: &'static str) -> R<i64> {
        match self.take(key)? {
            Attr::Int(v) => Ok(v),
            other => Err(wrong(key, "an integer", other)),
        }
    }
    fn usize(&mut self, key: &'static str) -> R<usize> {
        match self.take(key)? {
            Attr::Int(v) if v >= 0 => Ok(v as usize),
            other => Err(wrong(key, "a non-negative integer", other)),
        }
    }
    fn f64(&mut self, key: &'static str) -> R<F64> {
        match self.take(key)? {
            Attr::Float(v) => Ok(F64(v)),
            Attr::Int(v) => Ok(F64(v as f64)),
            other => Err(wrong(key, "a number", other)),
        }
    }
    fn bool(&mut self, key: &'static str) -> R<bool> {
        match self.take(key)? {
            Attr::Bool(v) => Ok(v),
            other => Err(wrong(key, "true or false", other)),
        }
    }
    fn shape(&mut self, key: &'static str) -> R<Shape> {
        match self.take(key)? {
            Attr::Shape(s) => Ok(s),
            other => Err(wrong(key, "a shape", other)),
        }
    }
    fn string(&mut self, key: &'static str) -> R<String> {
        match self.take(key)? {
            Attr::Str(s) => Ok(s),
            other => Err(wrong(key, "a string", other)),
        }
    }
    fn dtype(&mut self, key: &'static str) -> R<crate::dtype::DType> {
        match self.take(key)? {
            Attr::DType(d) => Ok(d),
            other => Err(wrong(key, "a dtype", other)),
        }
    }
}

/// The kind called `name` in the op table.
pub fn kind_named(name: &str) -> Option<OpKind> {
    OpKind::ALL.iter().copied().find(|k| k.info().name == name)
}

/// Builds an op from its name and attributes; the inverse of [`Op::name`] plus
/// [`Op::attrs`]. `weight_name` is the `@name` part of a weight token.
pub fn op_from_parts(
    name: &str,
    attrs: BTreeMap<String, Attr>,
    weight_name: Option<String>,
) -> Result<Op, OpPartsError> {
    if weight_name.is_some() && name != "weight" {
        return Err(OpPartsError::NameOnNonWeight(name.to_string()));
    }
    let kind = kind_named(name).ok_or_else(|| OpPartsError::UnknownOp(name.to_string()))?;
    let mut a = Attrs {
        op: kind.info().name,
        map: attrs,
    };
    let reduce = |kind, a: &mut Attrs| -> R<Op> {
        Ok(Op::Reduce {
            kind,
            axis: a.i64("axis")?,
            keepdim: a.bool("keepdim")?,
        })
    };
    let op = match kind {
        OpKind::Input => Op::Input {
            name: a.string("name")?,
            kind: InputKind::Data,
        },
        OpKind::State => Op::Input {
            name: a.string("name")?,
            kind: InputKind::State,
        },
        OpKind::Weight => Op::Weight {
            name: weight_name.ok_or(OpPartsError::WeightWithoutName)?,
        },
        OpKind::Scalar => Op::Scalar {
            value: a.f64("value")?,
        },
        OpKind::RopeInvFreq => Op::RopeInvFreq {
            head_dim: a.usize("head_dim")? as u64,
            theta: a.f64("theta")?,
        },
        OpKind::RopeInvFreqLlama3 => Op::RopeInvFreqLlama3 {
            factor: a.f64("factor")?,
            head_dim: a.usize("head_dim")? as u64,
            high_freq_factor: a.f64("high_freq_factor")?,
            low_freq_factor: a.f64("low_freq_factor")?,
            original_max_position_embeddings: a.usize("original_max_position_embeddings")? as u64,
            theta: a.f64("theta")?,
        },
        OpKind::UnaryNeg => Op::Unary(UnaryOp::Neg),
        OpKind::UnaryRsqrt => Op::Unary(UnaryOp::Rsqrt),
        OpKind::UnarySqrt => Op::Unary(UnaryOp::Sqrt),
        OpKind::UnaryExp => Op::Unary(UnaryOp::Exp),
        OpKind::UnarySilu => Op::Unary(UnaryOp::Silu),
        OpKind::UnaryTanh => Op::Unary(UnaryOp::Tanh),
        OpKind::UnaryGeluTanh => Op::Unary(UnaryOp::GeluTanh),
        OpKind::UnaryCos => Op::Unary(UnaryOp::Cos),
        OpKind::UnarySin => Op::Unary(UnaryOp::Sin),
        OpKind::BinaryAdd => Op::Binary(BinaryOp::Add),
        OpKind::BinarySub => Op::Binary(BinaryOp::Sub),
        OpKind::BinaryMul => Op::Binary(BinaryOp::Mul),
        OpKind::BinaryDiv => Op::Binary(BinaryOp::Div),
        OpKind::BinaryPow => Op::Binary(BinaryOp::Pow),
        OpKind::Cast => Op::Cast { to: a.dtype("to")? },
        OpKind::ReduceSum => reduce(ReduceOp::Sum, &mut a)?,
        OpKind::ReduceMean => reduce(ReduceOp::Mean, &mut a)?,
        OpKind::ReduceMax => reduce(ReduceOp::Max, &mut a)?,
        OpKind::Argmax => Op::Argmax {
            axis: a.i64("axis")?,
        },
        OpKind::Softmax => Op::Softmax {
            axis: a.i64("axis")?,
        },
        OpKind::MatMul => Op::MatMul,
        OpKind::Linear => Op::Linear,
        OpKind::Embedding => Op::Embedding,
        OpKind::Cat => Op::Cat {
            axis: a.i64("axis")?,
        },
        OpKind::Copy => Op::Copy,
        OpKind::Reshape => Op::Reshape {
            shape: a.shape("shape")?,
        },
        OpKind::Transpose => Op::Transpose {
            a: a.usize("a")?,
            b: a.usize("b")?,
        },
        OpKind::Slice => Op::Slice {
            axis: a.i64("axis")?,
            end: a.usize("end")? as u64,
            start: a.usize("start")? as u64,
        },
        OpKind::Unsqueeze => Op::Unsqueeze {
            axis: a.usize("axis")?,
        },
        OpKind::Expand => Op::Expand {
            shape: a.shape("shape")?,
        },
        OpKind::Get => Op::Get {
            index: a.usize("index")?,
        },
        OpKind::Dequant => Op::Dequant {
            act: a.dtype("act")?,
            to: a.dtype("to")?,
        },
        OpKind::KvAppend => Op::Fused(FusedOp::KvAppend),
        OpKind::Rope => Op::Fused(FusedOp::Rope),
        OpKind::RmsNorm => Op::Fused(FusedOp::RmsNorm),
        OpKind::PostRmsNorm => Op::Fused(FusedOp::PostRmsNorm),
        OpKind::OffsetRmsNorm => Op::Fused(FusedOp::OffsetRmsNorm),
        OpKind::RmsNormLinear => Op::Fused(FusedOp::RmsNormLinear),
        OpKind::MultiLinear => Op::Fused(FusedOp::MultiLinear),
        OpKind::Swiglu => Op::Fused(FusedOp::Swiglu),
        OpKind::Geglu => Op::Fused(FusedOp::Geglu),
        OpKind::OffsetRmsNormGeglu => Op::Fused(FusedOp::OffsetRmsNormGeglu),
        OpKind::OffsetRmsNormLinear => Op::Fused(FusedOp::OffsetRmsNormLinear),
        OpKind::RmsNormSwiglu => Op::Fused(FusedOp::RmsNormSwiglu),
        OpKind::LinearAdd => Op::Fused(FusedOp::LinearAdd),
        OpKind::LinearScaleAdd => Op::Fused(FusedOp::LinearScaleAdd),
        OpKind::LinearPostRmsNorm => Op::Fused(FusedOp::LinearPostRmsNorm),
        OpKind::LinearOffsetRmsNorm => Op::Fused(FusedOp::LinearOffsetRmsNorm),
        OpKind::Attention => Op::Fused(FusedOp::Attention),
        OpKind::DecodeAttention => Op::Fused(FusedOp::DecodeAttention),
        OpKind::DecodeAttentionCapped => Op::Fused(FusedOp::DecodeAttentionCapped),
        OpKind::PagedAttention => Op::Fused(FusedOp::PagedAttention),
        OpKind::PagedDecodeAttention => Op::Fused(FusedOp::PagedDecodeAttention),
    };
    if let Some(key) = a.map.keys().next() {
        return Err(OpPartsError::UnknownAttr {
            op: a.op,
            key: key.clone(),
        });
    }
    Ok(op)
}
