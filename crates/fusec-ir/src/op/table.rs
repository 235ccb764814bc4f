//! The op table: every fact about what an op *is*, stated once.
//!
//! One row per op name: its token name, its arity, the role of each operand, how it
//! executes (a leaf, a free view, folded into its user, or a kernel of some class) and
//! its attribute keys. Everything else reads this table: printing and parsing (names
//! and attributes), the verifier (which operands may be quantized weights), the cost
//! model and the CPU executor (which operands are GEMV weights or caches appended in
//! place, what launches), codegen (in-place results), precision lowering and the
//! report (kernel classes). The shape follows egg's `define_language!` and Cranelift's
//! instruction definitions (`cranelift/codegen/meta`): a declarative table from which
//! the per-op code is derived, so that adding an op is adding a row, and every
//! exhaustive `match` on [`OpKind`] elsewhere points at what else must change.

use std::fmt;

use super::def::{Arity, BinaryOp, FusedOp, InputKind, Op, ReduceOp, UnaryOp};

/// What an operand is to the op that reads it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum OperandRole {
    /// A tensor of activations read as data.
    Activation,
    /// A weight matrix `[out, in]` multiplied as a GEMV (`x @ W^T`); it may be a
    /// quantized `dequant` value, and may be bound in compact storage.
    GemvWeight,
    /// A normalisation's scale vector.
    NormWeight,
    /// A scalar kernel argument (`eps`, the attention scale).
    Scalar,
    /// A KV cache appended to in place: the op's result `result` is this operand grown
    /// by the new entries, written into the operand's buffer. `reads` says whether the
    /// op also reads the cached entries (attention does; a bare append does not).
    Cache { result: usize, reads: bool },
    /// A per-tensor quantization scale of a cache (stored entries are `x / scale`).
    CacheScale,
    /// The additive attention mask.
    Mask,
    /// A RoPE `cos` or `sin` table.
    RopeTable,
    /// An embedding table `[vocab, dim]`, of which a gather reads one row per id.
    EmbeddingTable,
    /// Token ids.
    Ids,
    /// The stored values of a quantized weight.
    QuantValues,
    /// The scales of a quantized weight.
    QuantScale,
    /// A tuple, read element by element.
    Tuple,
    /// A paged KV cache's addressing: the block table `[B,M]` or the sequences'
    /// positions `[B,1]` (i32), which say where each sequence's entries are.
    Paging,
}

impl OperandRole {
    /// Whether an operand in this role is read only as a GEMV weight (or as the stored
    /// values of one), so that it may be bound in compact storage.
    pub const fn is_gemv_weight(self) -> bool {
        matches!(self, OperandRole::GemvWeight | OperandRole::QuantValues)
    }
}

/// The kind of work a kernel does (the report's stacked bars of time per step).
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelClass {
    /// Products with weight matrices (projections, the MLP, lm_head), fused or not.
    Gemv,
    /// Attention over the KV cache: `q k^T`, softmax, `p v`, or one fused kernel.
    Attention,
    /// Copies: the KV cache grown by `cat`, `repeat_kv`'s copy, appends.
    Copies,
    /// Norms, RoPE, casts, activations, the embedding gather, argmax.
    Elementwise,
}

impl KernelClass {
    pub const ALL: [KernelClass; 4] = [
        KernelClass::Gemv,
        KernelClass::Attention,
        KernelClass::Copies,
        KernelClass::Elementwise,
    ];

    /// A short label for tables and chart legends.
    pub const fn label(self) -> &'static str {
        match self {
            KernelClass::Gemv => "GEMV (weights)",
            KernelClass::Attention => "attention",
            KernelClass::Copies => "KV cache & copies",
            KernelClass::Elementwise => "norms & elementwise",
        }
    }
}

/// How an op runs.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Execution {
    /// No operands: the value comes from outside the computation (an input, a weight,
    /// a scalar, a load-time constant).
    Leaf,
    /// A free view of its operand's storage (or an element of a tuple).
    View,
    /// Launches nothing: its only users read its operands directly (a quantized
    /// weight, dequantized in registers by the GEMV that reads it).
    Folded,
    /// One kernel launch of this class.
    Kernel(KernelClass),
}

/// One row of the op table.
#[derive(Copy, Clone, Debug)]
pub struct OpInfo {
    /// The token name (`reduce.mean`, `fused.rms_norm_linear`).
    pub name: &'static str,
    pub arity: Arity,
    /// The roles of the leading operands, in order.
    pub operands: &'static [OperandRole],
    /// The role of every operand after `operands`, for an op of variable arity.
    pub rest: Option<OperandRole>,
    pub execution: Execution,
    /// The attribute keys of the token, sorted (`weight`'s `@name` is not one).
    pub attrs: &'static [&'static str],
}

impl OpInfo {
    /// The role of operand `i`, or `None` past the op's operands.
    pub fn role(&self, i: usize) -> Option<OperandRole> {
        self.operands.get(i).copied().or(self.rest)
    }

    pub fn launches(&self) -> bool {
        matches!(self.execution, Execution::Kernel(_))
    }
}

macro_rules! op_table {
    ($(
        $kind:ident = $name:literal, $arity:expr, [$($role:expr),* $(,)?], $rest:expr,
            $execution:expr, [$($attr:literal),* $(,)?];
    )*) => {
        /// Every op name, as a fieldless enum: the rows of the op table.
        #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum OpKind { $($kind),* }

        impl OpKind {
            /// Every kind, in table order.
            pub const ALL: &'static [OpKind] = &[$(OpKind::$kind),*];

            /// This kind's row of the table.
            pub fn info(self) -> &'static OpInfo {
                &TABLE[self as usize]
            }
        }

        static TABLE: &[OpInfo] = &[$(
            OpInfo {
                name: $name,
                arity: $arity,
                operands: &[$($role),*],
                rest: $rest,
                execution: $execution,
                attrs: &[$($attr),*],
            }
        ),*];
    };
}

use Arity::{AtLeast, Exactly};
use Execution::{Folded, Kernel, Leaf, View};
use KernelClass::{Attention, Copies, Elementwise, Gemv};
use OperandRole::{
    Activation as Act, Cache, CacheScale, EmbeddingTable, GemvWeight as W, Ids, Mask,
    NormWeight as NormW, Paging, QuantScale, QuantValues, RopeTable as Rope, Scalar as Sc,
    Tuple as Tup,
};

op_table! {
    // ---- leaves -------------------------------------------------------------------
    Input = "input", Exactly(0), [], None, Leaf, ["name"];
    State = "state", Exactly(0), [], None, Leaf, ["name"];
    Weight = "weight", Exactly(0), [], None, Leaf, [];
    Scalar = "scalar", Exactly(0), [], None, Leaf, ["value"];
    RopeInvFreq = "rope.inv_freq", Exactly(0), [], None, Leaf, ["head_dim", "theta"];
    RopeInvFreqLlama3 = "rope.inv_freq_llama3", Exactly(0), [], None, Leaf,
        ["factor", "head_dim", "high_freq_factor", "low_freq_factor",
         "original_max_position_embeddings", "theta"];
    // ---- elementwise ----------------------------------------------------------------
    UnaryNeg = "unary.neg", Exactly(1), [Act], None, Kernel(Elementwise), [];
    UnaryRsqrt = "unary.rsqrt", Exactly(1), [Act], None, Kernel(Elementwise), [];
    UnarySqrt = "unary.sqrt", Exactly(1), [Act], None, Kernel(Elementwise), [];
    UnaryExp = "unary.exp", Exactly(1), [Act], None, Kernel(Elementwise), [];
    UnarySilu = "unary.silu", Exactly(1), [Act], None, Kernel(Elementwise), [];
    UnaryCos = "unary.cos", Exactly(1), [Act], None, Kernel(Elementwise), [];
    UnarySin = "unary.sin", Exactly(1), [Act], None, Kernel(Elementwise), [];
    UnaryTanh = "unary.tanh", Exactly(1), [Act], None, Kernel(Elementwise), [];
    UnaryGeluTanh = "unary.gelu_tanh", Exactly(1), [Act], None, Kernel(Elementwise), [];
    BinaryAdd = "binary.add", Exactly(2), [Act, Act], None, Kernel(Elementwise), [];
    BinarySub = "binary.sub", Exactly(2), [Act, Act], None, Kernel(Elementwise), [];
    BinaryMul = "binary.mul", Exactly(2), [Act, Act], None, Kernel(Elementwise), [];
    BinaryDiv = "binary.div", Exactly(2), [Act, Act], None, Kernel(Elementwise), [];
    BinaryPow = "binary.pow", Exactly(2), [Act, Act], None, Kernel(Elementwise), [];
    Cast = "cast", Exactly(1), [Act], None, Kernel(Elementwise), ["to"];
    // ---- reductions -----------------------------------------------------------------
    ReduceSum = "reduce.sum", Exactly(1), [Act], None, Kernel(Elementwise), ["axis", "keepdim"];
    ReduceMean = "reduce.mean", Exactly(1), [Act], None, Kernel(Elementwise), ["axis", "keepdim"];
    ReduceMax = "reduce.max", Exactly(1), [Act], None, Kernel(Elementwise), ["axis", "keepdim"];
    Argmax = "argmax", Exactly(1), [Act], None, Kernel(Elementwise), ["axis"];
    Softmax = "softmax", Exactly(1), [Act], None, Kernel(Attention), ["axis"];
    // ---- contractions ---------------------------------------------------------------
    MatMul = "matmul", Exactly(2), [Act, Act], None, Kernel(Attention), [];
    Linear = "linear", Exactly(2), [Act, W], None, Kernel(Gemv), [];
    Embedding = "embedding", Exactly(2), [EmbeddingTable, Ids], None, Kernel(Elementwise), [];
    // ---- data movement --------------------------------------------------------------
    Cat = "cat", AtLeast(2), [Act], Some(Act), Kernel(Copies), ["axis"];
    Copy = "copy", Exactly(1), [Act], None, Kernel(Copies), [];
    // ---- free views -----------------------------------------------------------------
    Reshape = "view.reshape", Exactly(1), [Act], None, View, ["shape"];
    Transpose = "view.transpose", Exactly(1), [Act], None, View, ["a", "b"];
    Slice = "view.slice", Exactly(1), [Act], None, View, ["axis", "end", "start"];
    Unsqueeze = "view.unsqueeze", Exactly(1), [Act], None, View, ["axis"];
    Expand = "view.expand", Exactly(1), [Act], None, View, ["shape"];
    Get = "get", Exactly(1), [Tup], None, View, ["index"];
    // ---- quantization ---------------------------------------------------------------
    Dequant = "dequant", Exactly(2), [QuantValues, QuantScale], None, Folded, ["act", "to"];
    // ---- fused kernels --------------------------------------------------------------
    KvAppend = "kv.append", Exactly(2), [Cache { result: 0, reads: false }, Act], None, Kernel(Copies), [];
    Rope = "fused.rope", Exactly(3), [Act, Rope, Rope], None, Kernel(Elementwise), [];
    RmsNorm = "fused.rms_norm", Exactly(3), [Act, NormW, Sc], None, Kernel(Elementwise), [];
    PostRmsNorm = "fused.post_rms_norm", AtLeast(3), [Act, NormW, Sc], Some(Act),
        Kernel(Elementwise), [];
    OffsetRmsNorm = "fused.offset_rms_norm", AtLeast(4), [Act, NormW, Sc, Sc], Some(Act),
        Kernel(Elementwise), [];
    RmsNormLinear = "fused.rms_norm_linear", AtLeast(4), [Act, NormW, Sc], Some(W),
        Kernel(Gemv), [];
    OffsetRmsNormLinear = "fused.offset_rms_norm_linear", AtLeast(5), [Act, NormW, Sc, Sc],
        Some(W), Kernel(Gemv), [];
    MultiLinear = "fused.multi_linear", AtLeast(3), [Act, W, W], Some(W), Kernel(Gemv), [];
    Swiglu = "fused.swiglu", Exactly(3), [Act, W, W], None, Kernel(Gemv), [];
    Geglu = "fused.geglu", Exactly(3), [Act, W, W], None, Kernel(Gemv), [];
    OffsetRmsNormGeglu = "fused.offset_rms_norm_geglu", Exactly(6), [Act, NormW, Sc, Sc, W, W],
        None, Kernel(Gemv), [];
    RmsNormSwiglu = "fused.rms_norm_swiglu", Exactly(5), [Act, NormW, Sc, W, W], None,
        Kernel(Gemv), [];
    LinearAdd = "fused.linear_add", Exactly(3), [Act, W, Act], None, Kernel(Gemv), [];
    LinearScaleAdd = "fused.linear_scale_add", Exactly(4), [Act, W, Sc, Act], None,
        Kernel(Gemv), [];
    LinearPostRmsNorm = "fused.linear_post_rms_norm", Exactly(5), [Act, W, NormW, Sc, Act],
        None, Kernel(Gemv), [];
    LinearOffsetRmsNorm = "fused.linear_offset_rms_norm", Exactly(6),
        [Act, W, NormW, Sc, Sc, Act], None, Kernel(Gemv), [];
    Attention = "fused.attention", AtLeast(5), [Act, Act, Act, Sc, Mask], Some(Sc),
        Kernel(Attention), [];
    DecodeAttention = "fused.decode_attention", AtLeast(9),
        [
            Act, Act, Act, Rope, Rope,
            Cache { result: 1, reads: true }, Cache { result: 2, reads: true }, Sc, Mask,
        ],
        Some(CacheScale), Kernel(Attention), [];
    DecodeAttentionCapped = "fused.decode_attention_capped", AtLeast(10),
        [
            Act, Act, Act, Rope, Rope,
            Cache { result: 1, reads: true }, Cache { result: 2, reads: true }, Sc, Mask, Sc,
        ],
        Some(CacheScale), Kernel(Attention), [];
    PagedAttention = "fused.paged_attention", AtLeast(8),
        [
            Act, Act, Act, Cache { result: 1, reads: true }, Cache { result: 2, reads: true },
            Paging, Paging, Sc,
        ],
        Some(Sc), Kernel(Attention), [];
    PagedDecodeAttention = "fused.paged_decode_attention", AtLeast(10),
        [
            Act, Act, Act, Rope, Rope,
            Cache { result: 1, reads: true }, Cache { result: 2, reads: true },
            Paging, Paging, Sc,
        ],
        Some(Sc), Kernel(Attention), [];
}

impl Op {
    /// The op's row in the table.
    pub fn kind(&self) -> OpKind {
        match self {
            Op::Input {
                kind: InputKind::Data,
                ..
            } => OpKind::Input,
            Op::Input {
                kind: InputKind::State,
                ..
            } => OpKind::State,
            Op::Weight { .. } => OpKind::Weight,
            Op::Scalar { .. } => OpKind::Scalar,
            Op::RopeInvFreq { .. } => OpKind::RopeInvFreq,
            Op::RopeInvFreqLlama3 { .. } => OpKind::RopeInvFreqLlama3,
            Op::Unary(u) => match u {
                UnaryOp::Neg => OpKind::UnaryNeg,
                UnaryOp::Rsqrt => OpKind::UnaryRsqrt,
                UnaryOp::Sqrt => OpKind::UnarySqrt,
                UnaryOp::Exp => OpKind::UnaryExp,
                UnaryOp::Silu => OpKind::UnarySilu,
                UnaryOp::Cos => OpKind::UnaryCos,
                UnaryOp::Sin => OpKind::UnarySin,
                UnaryOp::Tanh => OpKind::UnaryTanh,
                UnaryOp::GeluTanh => OpKind::UnaryGeluTanh,
            },
            Op::Binary(b) => match b {
                BinaryOp::Add => OpKind::BinaryAdd,
                BinaryOp::Sub => OpKind::BinarySub,
                BinaryOp::Mul => OpKind::BinaryMul,
                BinaryOp::Div => OpKind::BinaryDiv,
                BinaryOp::Pow => OpKind::BinaryPow,
            },
            Op::Cast { .. } => OpKind::Cast,
            Op::Reduce { kind, .. } => match kind {
                ReduceOp::Sum => OpKind::ReduceSum,
                ReduceOp::Mean => OpKind::ReduceMean,
                ReduceOp::Max => OpKind::ReduceMax,
            },
            Op::Argmax { .. } => OpKind::Argmax,
            Op::Softmax { .. } => OpKind::Softmax,
            Op::MatMul => OpKind::MatMul,
            Op::Linear => OpKind::Linear,
            Op::Embedding => OpKind::Embedding,
            Op::Cat { .. } => OpKind::Cat,
            Op::Copy => OpKind::Copy,
            Op::Reshape { .. } => OpKind::Reshape,
            Op::Transpose { .. } => OpKind::Transpose,
            Op::Slice { .. } => OpKind::Slice,
            Op::Unsqueeze { .. } => OpKind::Unsqueeze,
            Op::Expand { .. } => OpKind::Expand,
            Op::Get { .. } => OpKind::Get,
            Op::Dequant { .. } => OpKind::Dequant,
            Op::Fused(f) => f.kind(),
        }
    }

    /// The op's row in the table.
    pub fn info(&self) -> &'static OpInfo {
        self.kind().info()
    }

    /// The op's name (the token without attributes).
    pub fn name(&self) -> &'static str {
        self.info().name
    }

    /// How many operands the op takes.
    pub fn arity(&self) -> Arity {
        self.info().arity
    }

    /// A leaf: no operands, the value comes from outside the computation.
    pub fn is_leaf(&self) -> bool {
        self.info().execution == Execution::Leaf
    }

    /// A free view: the result shares the operand's storage, nothing is launched.
    pub fn is_view(&self) -> bool {
        self.info().execution == Execution::View
    }

    /// Whether executing the op launches a kernel. Leaves, views and folded ops (a
    /// quantized weight) launch nothing.
    pub fn launches_kernel(&self) -> bool {
        self.info().launches()
    }

    /// Kernels the CUDA backend launches for the op, where the CPU executor runs each
    /// launching op as one: a paged attention is two, the write of every row's new
    /// entry into the pools and then the attention, which must see all of them (a row
    /// of a prompt chunk reads its predecessors' entries); any other launching op one,
    /// the rest none.
    pub fn cuda_launches(&self) -> u64 {
        match self {
            Op::Fused(FusedOp::PagedAttention | FusedOp::PagedDecodeAttention) => 2,
            op => u64::from(op.launches_kernel()),
        }
    }

    /// The class of work of a kernel-launching op; `None` for ops that launch nothing.
    pub fn kernel_class(&self) -> Option<KernelClass> {
        match self.info().execution {
            Execution::Kernel(class) => Some(class),
            Execution::Leaf | Execution::View | Execution::Folded => None,
        }
    }

    /// The role of operand `i`.
    pub fn operand_role(&self, i: usize) -> Option<OperandRole> {
        self.info().role(i)
    }

    /// The operand positions, among `arity` operands, that hold GEMV weights (`[out,
    /// in]` matrices, which may be quantized `dequant` values).
    pub fn weight_operands(&self, arity: usize) -> impl Iterator<Item = usize> + '_ {
        let info = self.info();
        (0..arity).filter(move |&i| info.role(i) == Some(OperandRole::GemvWeight))
    }

    /// The caches the op appends to in place, as `(operand, result)` pairs: result
    /// `result` is operand `operand` grown by the new entries, in the same buffer.
    pub fn in_place(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.info()
            .operands
            .iter()
            .enumerate()
            .filter_map(|(i, role)| match role {
                OperandRole::Cache { result, .. } => Some((i, *result)),
                _ => None,
            })
    }
}

impl FusedOp {
    /// The op's row in the table.
    pub const fn kind(self) -> OpKind {
        match self {
            FusedOp::KvAppend => OpKind::KvAppend,
            FusedOp::Rope => OpKind::Rope,
            FusedOp::RmsNorm => OpKind::RmsNorm,
            FusedOp::PostRmsNorm => OpKind::PostRmsNorm,
            FusedOp::OffsetRmsNorm => OpKind::OffsetRmsNorm,
            FusedOp::RmsNormLinear => OpKind::RmsNormLinear,
            FusedOp::MultiLinear => OpKind::MultiLinear,
            FusedOp::Swiglu => OpKind::Swiglu,
            FusedOp::Geglu => OpKind::Geglu,
            FusedOp::OffsetRmsNormGeglu => OpKind::OffsetRmsNormGeglu,
            FusedOp::OffsetRmsNormLinear => OpKind::OffsetRmsNormLinear,
            FusedOp::RmsNormSwiglu => OpKind::RmsNormSwiglu,
            FusedOp::LinearAdd => OpKind::LinearAdd,
            FusedOp::LinearScaleAdd => OpKind::LinearScaleAdd,
            FusedOp::LinearPostRmsNorm => OpKind::LinearPostRmsNorm,
            FusedOp::LinearOffsetRmsNorm => OpKind::LinearOffsetRmsNorm,
            FusedOp::Attention => OpKind::Attention,
            FusedOp::DecodeAttention => OpKind::DecodeAttention,
            FusedOp::DecodeAttentionCapped => OpKind::DecodeAttentionCapped,
            FusedOp::PagedAttention => OpKind::PagedAttention,
            FusedOp::PagedDecodeAttention => OpKind::PagedDecodeAttention,
        }
    }

    /// The token name, e.g. `fused.rms_norm_linear`.
    pub fn name(self) -> &'static str {
        self.kind().info().name
    }

    pub fn arity(self) -> Arity {
        self.kind().info().arity
    }
}

/// The part of a name after its family prefix: `neg` for `unary.neg`.
fn short(name: &'static str) -> &'static str {
    name.split_once('.').map_or(name, |(_, s)| s)
}

impl UnaryOp {
    /// The function's name without its family, e.g. `neg`.
    pub fn name(self) -> &'static str {
        short(Op::Unary(self).name())
    }
}

impl BinaryOp {
    /// The function's name without its family, e.g. `add`.
    pub fn name(self) -> &'static str {
        short(Op::Binary(self).name())
    }
}

impl ReduceOp {
    /// The reduction's name without its family, e.g. `mean`.
    pub fn name(self) -> &'static str {
        short(
            Op::Reduce {
                kind: self,
                axis: 0,
                keepdim: false,
            }
            .name(),
        )
    }
}

impl fmt::Display for Op {
    /// The op token: `name` or `name{key=value,...}` with keys sorted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        let attrs = self.attrs();
        if !attrs.is_empty() {
            f.write_str("{")?;
            for (i, (k, v)) in attrs.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{k}={v}")?;
            }
            f.write_str("}")?;
        }
        if let Op::Weight { name } = self {
            write!(f, "@{name}")?;
        }
        Ok(())
    }
}

/// Every op name, for error messages and the e-graph's language.
pub fn op_names() -> impl Iterator<Item = &'static str> {
    OpKind::ALL.iter().map(|k| k.info().name)
}
