//! The closed set of operations, shared by the IR graph and the rewrite e-graph.
//!
//! An [`Op`] is an operation together with its attributes (axis, shape, weight name…),
//! but without its operands: operands are edges of the graph, or children of an e-node.
//! Every op has exactly one textual form, its *token* (`reduce.mean{axis=2,keepdim=true}`),
//! used by the text IR, the rule files and the e-graph alike, so there is one source of
//! op names. [`Op::infer`] gives the result type from the operand types, and
//! [`Op::is_view`] says whether the op is a free view (no kernel launch).

use std::collections::BTreeMap;
use std::fmt;

use crate::dtype::DType;
use crate::shape::{Dim, Shape};
use crate::types::{TensorType, Type};

/// An `f64` attribute with total equality and hashing (by bits), so that ops can be
/// hashed into an e-graph. It prints in Rust's shortest round-trip form.
#[derive(Copy, Clone, Debug)]
pub struct F64(pub f64);

impl PartialEq for F64 {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}
impl Eq for F64 {}
impl std::hash::Hash for F64 {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state);
    }
}
impl PartialOrd for F64 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for F64 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}
impl fmt::Display for F64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Elementwise functions of one tensor.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UnaryOp {
    Neg,
    Rsqrt,
    Sqrt,
    Exp,
    Silu,
    Cos,
    Sin,
}

impl UnaryOp {
    pub const ALL: [UnaryOp; 7] = [
        UnaryOp::Neg,
        UnaryOp::Rsqrt,
        UnaryOp::Sqrt,
        UnaryOp::Exp,
        UnaryOp::Silu,
        UnaryOp::Cos,
        UnaryOp::Sin,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Exp => "exp",
            UnaryOp::Silu => "silu",
            UnaryOp::Cos => "cos",
            UnaryOp::Sin => "sin",
        }
    }

    /// FLOPs charged per element (a transcendental counts as a few).
    pub const fn flops_per_element(self) -> u64 {
        match self {
            UnaryOp::Neg => 1,
            UnaryOp::Rsqrt | UnaryOp::Sqrt => 2,
            UnaryOp::Exp | UnaryOp::Cos | UnaryOp::Sin => 4,
            UnaryOp::Silu => 6,
        }
    }

    /// Applies the function in f64 (the reference semantics).
    pub fn apply(self, x: f64) -> f64 {
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Rsqrt => 1.0 / x.sqrt(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Exp => x.exp(),
            UnaryOp::Silu => x / (1.0 + (-x).exp()),
            UnaryOp::Cos => x.cos(),
            UnaryOp::Sin => x.sin(),
        }
    }
}

/// Elementwise functions of two tensors, with numpy broadcasting.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
}

impl BinaryOp {
    pub const ALL: [BinaryOp; 5] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Pow,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Pow => "pow",
        }
    }

    pub fn apply(self, a: f64, b: f64) -> f64 {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            BinaryOp::Pow => a.powf(b),
        }
    }
}

/// Reductions over one axis.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
}

impl ReduceOp {
    pub const ALL: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max];

    pub const fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
            ReduceOp::Max => "max",
        }
    }
}

/// Which kind of graph input an `input`/`state` leaf is.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InputKind {
    /// Fed by the caller each step (token ids, positions, the attention mask).
    Data,
    /// Carried from the previous step (the KV cache); the graph returns its next value as
    /// a state output of the same name.
    State,
}

/// An operation with its attributes. See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    // ---- leaves -------------------------------------------------------------------
    /// A graph input; its type is the node's type.
    Input {
        name: String,
        kind: InputKind,
    },
    /// A named weight (the safetensors tensor name); its type is the node's type.
    Weight {
        name: String,
    },
    /// A scalar kernel argument, `f32[]`. Broadcasts against any tensor and takes the
    /// other operand's dtype, as a Python scalar does in PyTorch.
    Scalar {
        value: F64,
    },
    /// RoPE inverse frequencies `theta^(-2j/head_dim)`, `f32[head_dim/2]`: a constant
    /// buffer computed when the model is loaded, like HF's `inv_freq`.
    RopeInvFreq {
        theta: F64,
        head_dim: u64,
    },

    // ---- elementwise --------------------------------------------------------------
    Unary(UnaryOp),
    Binary(BinaryOp),
    /// Elementwise conversion to another dtype.
    Cast {
        to: DType,
    },

    // ---- reductions ---------------------------------------------------------------
    Reduce {
        kind: ReduceOp,
        axis: i64,
        keepdim: bool,
    },
    /// Index of the largest element along `axis` (ties to the lowest index), as `i32`.
    Argmax {
        axis: i64,
    },
    Softmax {
        axis: i64,
    },

    // ---- contractions -------------------------------------------------------------
    /// Batched matrix product with broadcast batch dimensions, as `torch.matmul`.
    MatMul,
    /// `x @ w^T` with `w` of shape `[out, in]`, as `torch.nn.functional.linear`.
    Linear,
    /// Row gather: operands `(table [V, D], ids [...])`, result `[..., D]`.
    Embedding,

    // ---- data movement ------------------------------------------------------------
    /// Concatenation along `axis` into a new buffer (a copy of every operand).
    Cat {
        axis: i64,
    },
    /// A contiguous copy (`.contiguous()` or the copy inside `reshape` of a
    /// non-viewable tensor).
    Copy,

    // ---- free views ---------------------------------------------------------------
    Reshape {
        shape: Shape,
    },
    Transpose {
        a: usize,
        b: usize,
    },
    /// Elements `start..end` along `axis`.
    Slice {
        axis: i64,
        start: u64,
        end: u64,
    },
    Unsqueeze {
        axis: usize,
    },
    /// Broadcast size-1 dimensions to `shape` (stride 0, no copy).
    Expand {
        shape: Shape,
    },

    // ---- tuples -------------------------------------------------------------------
    /// Element `index` of a tuple-typed operand (free).
    Get {
        index: usize,
    },

    // ---- quantization ---------------------------------------------------------------
    /// `(q [.., in], scale [..] or []) -> to[.., in]`: a quantized weight with its
    /// per-output-channel (or per-tensor) scales, `w = q * scale`. It launches nothing:
    /// only GEMV-family ops consume it, dequantizing in registers. `act` is the recipe of
    /// that GEMV's activations: `fp8e4m3` quantizes each activation row (token) to E4M3
    /// with a dynamic scale `absmax / 448` and multiplies in FP8 with f32 accumulation,
    /// folding both scales into the epilogue; `act == to` keeps activations unquantized.
    Dequant {
        to: DType,
        act: DType,
    },

    // ---- fused kernels ------------------------------------------------------------
    /// A kernel that replaces several primitive ops; see [`FusedOp`].
    Fused(FusedOp),
}

/// Kernels produced by fusion. None has attributes: constants such as `eps` and the
/// attention scale are scalar operands, so rewrite rules can bind them as variables.
///
/// Every fused op computes what the primitive ops it replaces compute, with the same
/// roundings to its dtype (a bf16 intermediate of the eager graph is rounded to bf16
/// inside the fused kernel too), so the eager graph is its reference.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FusedOp {
    /// `(past [..,S,hd], new [..,1,hd]) -> [..,S+1,hd]`: `cat` along axis -2 into the
    /// state buffer in place: only the new entries are read and written.
    KvAppend,
    /// `(x [..,hd], cos, sin) -> x * cos + rotate_half(x) * sin`, cos and sin
    /// broadcasting to x.
    Rope,
    /// `(x [..,D], w [D], eps) -> w * to(x.dtype)(x32 * rsqrt(mean(x32^2, -1) + eps))`,
    /// Hugging Face's `LlamaRMSNorm`.
    RmsNorm,
    /// `(x, w, eps, W1, .., Wn)`: RMSNorm in the prologue of n GEMVs sharing it. One
    /// weight gives a tensor, several a tuple.
    RmsNormLinear,
    /// `(x, Wg, Wu) -> silu(x @ Wg^T) * (x @ Wu^T)`.
    Swiglu,
    /// `(x, w, eps, Wg, Wu)`: RMSNorm then SwiGLU in one kernel.
    RmsNormSwiglu,
    /// `(x, W, r) -> r + x @ W^T`: a GEMV with a residual-add epilogue.
    LinearAdd,
    /// `(q [B,H,T,hd], k [B,KV,L,hd], v [B,KV,L,hd], scale, mask [B,1,T,L]) ->
    /// softmax(q k^T * scale + mask) v`, with query head `h` reading KV head
    /// `h / (H/KV)` (GQA), computed with an online softmax.
    Attention,
    /// `(q, k, v, cos, sin, past_k, past_v, scale, mask) -> (out, k_all, v_all)`: RoPE
    /// on q and k, the KV append in place, and attention, in one kernel.
    DecodeAttention,
}

impl FusedOp {
    pub const ALL: [FusedOp; 9] = [
        FusedOp::KvAppend,
        FusedOp::Rope,
        FusedOp::RmsNorm,
        FusedOp::RmsNormLinear,
        FusedOp::Swiglu,
        FusedOp::RmsNormSwiglu,
        FusedOp::LinearAdd,
        FusedOp::Attention,
        FusedOp::DecodeAttention,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            FusedOp::KvAppend => "kv.append",
            FusedOp::Rope => "fused.rope",
            FusedOp::RmsNorm => "fused.rms_norm",
            FusedOp::RmsNormLinear => "fused.rms_norm_linear",
            FusedOp::Swiglu => "fused.swiglu",
            FusedOp::RmsNormSwiglu => "fused.rms_norm_swiglu",
            FusedOp::LinearAdd => "fused.linear_add",
            FusedOp::Attention => "fused.attention",
            FusedOp::DecodeAttention => "fused.decode_attention",
        }
    }

    pub const fn arity(self) -> Arity {
        match self {
            FusedOp::KvAppend => Arity::Exactly(2),
            FusedOp::Rope | FusedOp::RmsNorm | FusedOp::Swiglu | FusedOp::LinearAdd => {
                Arity::Exactly(3)
            }
            FusedOp::RmsNormLinear => Arity::AtLeast(4),
            FusedOp::RmsNormSwiglu | FusedOp::Attention => Arity::Exactly(5),
            FusedOp::DecodeAttention => Arity::AtLeast(9),
        }
    }
}

/// The axis `axis` of a rank-`rank` tensor, where a negative axis counts from the end
/// as in PyTorch (`-1` is the last).
pub fn resolve_axis(axis: i64, rank: usize) -> Result<usize, String> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if (0..r).contains(&a) {
        Ok(a as usize)
    } else {
        Err(format!("axis {axis} out of range for rank {rank}"))
    }
}

/// How many operands an op takes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Arity {
    Exactly(usize),
    AtLeast(usize),
}

impl Arity {
    pub fn accepts(self, n: usize) -> bool {
        match self {
            Arity::Exactly(k) => n == k,
            Arity::AtLeast(k) => n >= k,
        }
    }
}

impl fmt::Display for Arity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arity::Exactly(k) => write!(f, "{k}"),
            Arity::AtLeast(k) => write!(f, "at least {k}"),
        }
    }
}

/// An attribute value, as written in an op token.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Shape(Shape),
    DType(DType),
}

impl fmt::Display for Attr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attr::Int(v) => write!(f, "{v}"),
            Attr::Float(v) => write!(f, "{v:?}"),
            Attr::Bool(v) => write!(f, "{v}"),
            Attr::Str(s) => write!(f, "{s:?}"),
            Attr::Shape(s) => write!(f, "{s}"),
            Attr::DType(d) => write!(f, "{d}"),
        }
    }
}

/// Why an operand list does not type-check for an op.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{op}: {message}")]
pub struct TypeError {
    /// The op's name.
    pub op: String,
    pub message: String,
}

impl Op {
    /// The op's name (the token without attributes).
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input {
                kind: InputKind::Data,
                ..
            } => "input",
            Op::Input {
                kind: InputKind::State,
                ..
            } => "state",
            Op::Weight { .. } => "weight",
            Op::Scalar { .. } => "scalar",
            Op::RopeInvFreq { .. } => "rope.inv_freq",
            Op::Unary(u) => match u {
                UnaryOp::Neg => "unary.neg",
                UnaryOp::Rsqrt => "unary.rsqrt",
                UnaryOp::Sqrt => "unary.sqrt",
                UnaryOp::Exp => "unary.exp",
                UnaryOp::Silu => "unary.silu",
                UnaryOp::Cos => "unary.cos",
                UnaryOp::Sin => "unary.sin",
            },
            Op::Binary(b) => match b {
                BinaryOp::Add => "binary.add",
                BinaryOp::Sub => "binary.sub",
                BinaryOp::Mul => "binary.mul",
                BinaryOp::Div => "binary.div",
                BinaryOp::Pow => "binary.pow",
            },
            Op::Cast { .. } => "cast",
            Op::Reduce { kind, .. } => match kind {
                ReduceOp::Sum => "reduce.sum",
                ReduceOp::Mean => "reduce.mean",
                ReduceOp::Max => "reduce.max",
            },
            Op::Argmax { .. } => "argmax",
            Op::Softmax { .. } => "softmax",
            Op::MatMul => "matmul",
            Op::Linear => "linear",
            Op::Embedding => "embedding",
            Op::Cat { .. } => "cat",
            Op::Copy => "copy",
            Op::Reshape { .. } => "view.reshape",
            Op::Transpose { .. } => "view.transpose",
            Op::Slice { .. } => "view.slice",
            Op::Unsqueeze { .. } => "view.unsqueeze",
            Op::Expand { .. } => "view.expand",
            Op::Get { .. } => "get",
            Op::Dequant { .. } => "dequant",
            Op::Fused(f) => f.name(),
        }
    }

    /// The attributes, sorted by key. Leaf names of weights are not attributes: the text
    /// form writes them as `@name`.
    pub fn attrs(&self) -> Vec<(&'static str, Attr)> {
        let u = |v: usize| Attr::Int(v as i64);
        let i = |v: i64| Attr::Int(v);
        let mut attrs = match self {
            Op::Input { name, .. } => vec![("name", Attr::Str(name.clone()))],
            Op::Weight { .. } => vec![],
            Op::Scalar { value } => vec![("value", Attr::Float(value.0))],
            Op::RopeInvFreq { theta, head_dim } => vec![
                ("head_dim", Attr::Int(*head_dim as i64)),
                ("theta", Attr::Float(theta.0)),
            ],
            Op::Cast { to } => vec![("to", Attr::DType(*to))],
            Op::Reduce { axis, keepdim, .. } => {
                vec![("axis", i(*axis)), ("keepdim", Attr::Bool(*keepdim))]
            }
            Op::Argmax { axis } | Op::Softmax { axis } | Op::Cat { axis } => {
                vec![("axis", i(*axis))]
            }
            Op::Unsqueeze { axis } => vec![("axis", u(*axis))],
            Op::Reshape { shape } | Op::Expand { shape } => {
                vec![("shape", Attr::Shape(shape.clone()))]
            }
            Op::Transpose { a, b } => vec![("a", u(*a)), ("b", u(*b))],
            Op::Slice { axis, start, end } => vec![
                ("axis", i(*axis)),
                ("end", Attr::Int(*end as i64)),
                ("start", Attr::Int(*start as i64)),
            ],
            Op::Get { index } => vec![("index", u(*index))],
            Op::Dequant { to, act } => vec![("act", Attr::DType(*act)), ("to", Attr::DType(*to))],
            Op::Unary(_)
            | Op::Binary(_)
            | Op::MatMul
            | Op::Linear
            | Op::Embedding
            | Op::Copy
            | Op::Fused(_) => vec![],
        };
        attrs.sort_by_key(|(k, _)| *k);
        attrs
    }

    /// How many operands the op takes.
    pub fn arity(&self) -> Arity {
        match self {
            Op::Input { .. } | Op::Weight { .. } | Op::Scalar { .. } | Op::RopeInvFreq { .. } => {
                Arity::Exactly(0)
            }
            Op::Unary(_)
            | Op::Cast { .. }
            | Op::Reduce { .. }
            | Op::Argmax { .. }
            | Op::Softmax { .. }
            | Op::Copy
            | Op::Reshape { .. }
            | Op::Transpose { .. }
            | Op::Slice { .. }
            | Op::Unsqueeze { .. }
            | Op::Expand { .. }
            | Op::Get { .. } => Arity::Exactly(1),
            Op::Binary(_) | Op::MatMul | Op::Linear | Op::Embedding | Op::Dequant { .. } => {
                Arity::Exactly(2)
            }
            Op::Cat { .. } => Arity::AtLeast(2),
            Op::Fused(f) => f.arity(),
        }
    }

    /// A leaf: no operands, the value comes from outside the computation.
    pub fn is_leaf(&self) -> bool {
        self.arity() == Arity::Exactly(0)
    }

    /// A free view: the result shares the operand's storage, nothing is launched.
    pub fn is_view(&self) -> bool {
        matches!(
            self,
            Op::Reshape { .. }
                | Op::Transpose { .. }
                | Op::Slice { .. }
                | Op::Unsqueeze { .. }
                | Op::Expand { .. }
                | Op::Get { .. }
        )
    }

    /// Whether executing the op launches a kernel. Leaves (inputs, weights, scalars,
    /// load-time constants) and views launch nothing.
    pub fn launches_kernel(&self) -> bool {
        !self.is_leaf() && !self.is_view() && !matches!(self, Op::Dequant { .. })
    }

    /// The operand positions that hold GEMV weights (`[out, in]` matrices), which may
    /// be quantized `dequant` values.
    pub fn weight_operands(&self, arity: usize) -> std::ops::Range<usize> {
        match self {
            Op::Linear => 1..2,
            Op::Fused(FusedOp::Swiglu) => 1..3,
            Op::Fused(FusedOp::LinearAdd) => 1..2,
            Op::Fused(FusedOp::RmsNormLinear) => 3..arity,
            Op::Fused(FusedOp::RmsNormSwiglu) => 3..5,
            _ => 0..0,
        }
    }

    /// The result type of this op applied to operands of the given types.
    ///
    /// `leaf_type` is the declared type of an `input`, `state` or `weight` leaf, whose
    /// type cannot be inferred; it is ignored for every other op.
    pub fn infer(&self, operands: &[&Type], leaf_type: Option<&Type>) -> Result<Type, TypeError> {
        let err = |message: String| TypeError {
            op: self.name().to_string(),
            message,
        };
        if !self.arity().accepts(operands.len()) {
            return Err(err(format!(
                "takes {} operand(s), got {}",
                self.arity(),
                operands.len()
            )));
        }
        if matches!(self, Op::Get { .. }) {
            let Op::Get { index } = self else {
                unreachable!()
            };
            return match operands[0] {
                Type::Tuple(ts) => ts
                    .get(*index)
                    .cloned()
                    .map(Type::Tensor)
                    .ok_or_else(|| err(format!("index {index} out of a {}-tuple", ts.len()))),
                Type::Tensor(t) => Err(err(format!("operand is a tensor ({t}), not a tuple"))),
            };
        }
        let mut tensors = Vec::with_capacity(operands.len());
        for (i, t) in operands.iter().enumerate() {
            match t {
                Type::Tensor(t) => tensors.push(t),
                Type::Tuple(_) => {
                    return Err(err(format!(
                        "operand {i} is a tuple; read its elements with `get`"
                    )))
                }
            }
        }
        if let Op::Fused(f) = self {
            return crate::fused::infer(*f, &tensors).map_err(err);
        }
        infer_tensor(self, &tensors, leaf_type)
            .map(Type::Tensor)
            .map_err(err)
    }
}

fn check_axis(axis: usize, rank: usize) -> Result<(), String> {
    if axis < rank {
        Ok(())
    } else {
        Err(format!("axis {axis} out of range for rank {rank}"))
    }
}

fn infer_tensor(
    op: &Op,
    t: &[&TensorType],
    leaf_type: Option<&Type>,
) -> Result<TensorType, String> {
    let same_dtype = |a: &TensorType, b: &TensorType| {
        if a.dtype == b.dtype {
            Ok(())
        } else {
            Err(format!("dtype mismatch: {} vs {}", a.dtype, b.dtype))
        }
    };
    match op {
        Op::Input { .. } | Op::Weight { .. } => match leaf_type {
            Some(Type::Tensor(t)) => Ok(t.clone()),
            Some(Type::Tuple(_)) => Err("a leaf must have a tensor type".into()),
            None => Err("a leaf needs a declared type".into()),
        },
        Op::Scalar { .. } => Ok(TensorType::new(DType::F32, Shape::scalar())),
        Op::RopeInvFreq { head_dim, .. } => {
            if *head_dim == 0 || head_dim % 2 != 0 {
                return Err(format!("head_dim {head_dim} must be even and positive"));
            }
            Ok(TensorType::new(DType::F32, Shape::fixed(&[head_dim / 2])))
        }
        Op::Unary(_) | Op::Copy => {
            if !t[0].dtype.is_float() && !matches!(op, Op::Copy) {
                return Err(format!("needs a float operand, got {}", t[0].dtype));
            }
            Ok(t[0].clone())
        }
        Op::Cast { to } => Ok(TensorType::new(*to, t[0].shape.clone())),
        Op::Binary(_) => {
            let (a, b) = (t[0], t[1]);
            let dtype = if a.rank() == 0 {
                b.dtype
            } else if b.rank() == 0 {
                a.dtype
            } else {
                same_dtype(a, b)?;
                a.dtype
            };
            let shape = Shape::broadcast(&a.shape, &b.shape)
                .ok_or_else(|| format!("shapes {} and {} do not broadcast", a.shape, b.shape))?;
            Ok(TensorType::new(dtype, shape))
        }
        Op::Reduce { axis, keepdim, .. } => {
            let axis = resolve_axis(*axis, t[0].rank())?;
            let mut dims = t[0].shape.0.clone();
            if *keepdim {
                dims[axis] = Dim::Fixed(1);
            } else {
                dims.remove(axis);
            }
            Ok(TensorType::new(t[0].dtype, Shape(dims)))
        }
        Op::Argmax { axis } => {
            let axis = resolve_axis(*axis, t[0].rank())?;
            let mut dims = t[0].shape.0.clone();
            dims.remove(axis);
            Ok(TensorType::new(DType::I32, Shape(dims)))
        }
        Op::Softmax { axis } => {
            resolve_axis(*axis, t[0].rank())?;
            Ok(t[0].clone())
        }
        Op::MatMul => {
            let (a, b) = (t[0], t[1]);
            same_dtype(a, b)?;
            if a.rank() < 2 || b.rank() < 2 {
                return Err(format!(
                    "operands must have rank >= 2, got {} and {}",
                    a.shape, b.shape
                ));
            }
            let (ra, rb) = (a.rank(), b.rank());
            if a.shape.0[ra - 1] != b.shape.0[rb - 2] {
                return Err(format!(
                    "contracted dimensions differ: {} @ {}",
                    a.shape, b.shape
                ));
            }
            let batch = Shape::broadcast(
                &Shape(a.shape.0[..ra - 2].to_vec()),
                &Shape(b.shape.0[..rb - 2].to_vec()),
            )
            .ok_or_else(|| {
                format!(
                    "batch dimensions of {} and {} do not broadcast",
                    a.shape, b.shape
                )
            })?;
            let mut dims = batch.0;
            dims.push(a.shape.0[ra - 2].clone());
            dims.push(b.shape.0[rb - 1].clone());
            Ok(TensorType::new(a.dtype, Shape(dims)))
        }
        Op::Linear => {
            let (x, w) = (t[0], t[1]);
            same_dtype(x, w)?;
            if w.rank() != 2 || x.rank() == 0 {
                return Err(format!(
                    "needs x [..., in] and w [out, in], got {} and {}",
                    x.shape, w.shape
                ));
            }
            if x.shape.last() != Some(&w.shape.0[1]) {
                return Err(format!(
                    "input features differ: x {} vs w {}",
                    x.shape, w.shape
                ));
            }
            let mut dims = x.shape.0.clone();
            *dims.last_mut().expect("rank checked above") = w.shape.0[0].clone();
            Ok(TensorType::new(x.dtype, Shape(dims)))
        }
        Op::Embedding => {
            let (table, ids) = (t[0], t[1]);
            if table.rank() != 2 {
                return Err(format!("table must be [vocab, dim], got {}", table.shape));
            }
            if ids.dtype != DType::I32 {
                return Err(format!("ids must be i32, got {}", ids.dtype));
            }
            let mut dims = ids.shape.0.clone();
            dims.push(table.shape.0[1].clone());
            Ok(TensorType::new(table.dtype, Shape(dims)))
        }
        Op::Cat { axis } => {
            let first = t[0];
            let axis = resolve_axis(*axis, first.rank())?;
            let mut along = first.shape.0[axis].clone();
            for other in &t[1..] {
                same_dtype(first, other)?;
                if other.rank() != first.rank() {
                    return Err(format!("ranks differ: {} vs {}", first.shape, other.shape));
                }
                for (i, (a, b)) in first.shape.0.iter().zip(&other.shape.0).enumerate() {
                    if i != axis && a != b {
                        return Err(format!(
                            "dimension {i} differs: {} vs {}",
                            first.shape, other.shape
                        ));
                    }
                }
                along = match (&along, &other.shape.0[axis]) {
                    (x, Dim::Fixed(n)) => x.plus(*n),
                    (Dim::Fixed(n), y) => y.plus(*n),
                    (x, y) => {
                        return Err(format!(
                            "cannot add two symbolic dimensions {x} and {y} along axis {axis}"
                        ))
                    }
                };
            }
            let mut dims = first.shape.0.clone();
            dims[axis] = along;
            Ok(TensorType::new(first.dtype, Shape(dims)))
        }
        Op::Reshape { shape } => {
            if t[0].shape.symbolic_numel() != shape.symbolic_numel() {
                return Err(format!(
                    "cannot reshape {} to {}: element counts differ",
                    t[0].shape, shape
                ));
            }
            Ok(TensorType::new(t[0].dtype, shape.clone()))
        }
        Op::Transpose { a, b } => {
            check_axis(*a, t[0].rank())?;
            check_axis(*b, t[0].rank())?;
            let mut dims = t[0].shape.0.clone();
            dims.swap(*a, *b);
            Ok(TensorType::new(t[0].dtype, Shape(dims)))
        }
        Op::Slice { axis, start, end } => {
            let axis = resolve_axis(*axis, t[0].rank())?;
            let Some(n) = t[0].shape.0[axis].as_fixed() else {
                return Err(format!("axis {axis} of {} is symbolic", t[0].shape));
            };
            if start >= end || *end > n {
                return Err(format!("range {start}..{end} out of 0..{n}"));
            }
            let mut dims = t[0].shape.0.clone();
            dims[axis] = Dim::Fixed(end - start);
            Ok(TensorType::new(t[0].dtype, Shape(dims)))
        }
        Op::Unsqueeze { axis } => {
            check_axis(*axis, t[0].rank() + 1)?;
            let mut dims = t[0].shape.0.clone();
            dims.insert(*axis, Dim::Fixed(1));
            Ok(TensorType::new(t[0].dtype, Shape(dims)))
        }
        Op::Expand { shape } => {
            if shape.rank() != t[0].rank() {
                return Err(format!(
                    "cannot expand {} to {}: ranks differ",
                    t[0].shape, shape
                ));
            }
            for (a, b) in t[0].shape.0.iter().zip(&shape.0) {
                if a != b && !a.is_one() {
                    return Err(format!(
                        "cannot expand {} to {}: only size-1 dimensions expand",
                        t[0].shape, shape
                    ));
                }
            }
            Ok(TensorType::new(t[0].dtype, shape.clone()))
        }
        Op::Dequant { to, act } => {
            let (q, scale) = (t[0], t[1]);
            if !q.dtype.is_fp8() {
                return Err(format!("quantized values must be fp8, got {}", q.dtype));
            }
            if !matches!(to, DType::F32 | DType::F16 | DType::Bf16) {
                return Err(format!("dequantizes to f32, f16 or bf16, not {to}"));
            }
            if act != to && !act.is_fp8() {
                return Err(format!("activations are {to} or fp8, not {act}"));
            }
            if scale.dtype != DType::F32 {
                return Err(format!("scales must be f32, got {}", scale.dtype));
            }
            let per_channel = Shape(q.shape.0[..q.rank().saturating_sub(1)].to_vec());
            if scale.rank() != 0 && scale.shape != per_channel {
                return Err(format!(
                    "scales {} must be per tensor [] or per output channel {per_channel}",
                    scale.shape
                ));
            }
            Ok(TensorType::new(*to, q.shape.clone()))
        }
        Op::Get { .. } => unreachable!("handled by Op::infer"),
        Op::Fused(_) => unreachable!("handled by Op::infer"),
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

/// Why an op token does not parse; `offset` is a byte offset into the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct OpParseError {
    pub offset: usize,
    pub message: String,
}

/// Every op name, for error messages and the e-graph's language.
pub fn op_names() -> Vec<&'static str> {
    let mut names = vec![
        "input",
        "state",
        "weight",
        "scalar",
        "rope.inv_freq",
        "cast",
        "argmax",
        "softmax",
        "matmul",
        "linear",
        "embedding",
        "cat",
        "copy",
        "view.reshape",
        "view.transpose",
        "view.slice",
        "view.unsqueeze",
        "view.expand",
        "get",
        "dequant",
    ];
    names.extend(UnaryOp::ALL.iter().map(|u| Op::Unary(*u).name()));
    names.extend(FusedOp::ALL.iter().map(|f| f.name()));
    names.extend(BinaryOp::ALL.iter().map(|b| Op::Binary(*b).name()));
    names.extend(ReduceOp::ALL.iter().map(|r| {
        Op::Reduce {
            kind: *r,
            axis: 0,
            keepdim: false,
        }
        .name()
    }));
    names
}

impl std::str::FromStr for Op {
    type Err = OpParseError;

    /// Parses an op token as printed by `Display`.
    fn from_str(token: &str) -> Result<Op, OpParseError> {
        crate::text::token::parse_op_token(token)
    }
}

/// Builds an op from its name and attributes; the inverse of [`Op::name`] plus
/// [`Op::attrs`]. `weight_name` is the `@name` part of a weight token.
pub fn op_from_parts(
    name: &str,
    mut attrs: BTreeMap<String, Attr>,
    weight_name: Option<String>,
) -> Result<Op, String> {
    let mut take = |key: &str| {
        attrs
            .remove(key)
            .ok_or_else(|| format!("`{name}` needs attribute `{key}`"))
    };
    fn i64_of(key: &str, a: Attr) -> Result<i64, String> {
        match a {
            Attr::Int(v) => Ok(v),
            other => Err(format!("attribute `{key}` must be an integer, got {other}")),
        }
    }
    fn usize_of(key: &str, a: Attr) -> Result<usize, String> {
        match a {
            Attr::Int(v) if v >= 0 => Ok(v as usize),
            other => Err(format!(
                "attribute `{key}` must be a non-negative integer, got {other}"
            )),
        }
    }
    fn f64_of(key: &str, a: Attr) -> Result<F64, String> {
        match a {
            Attr::Float(v) => Ok(F64(v)),
            Attr::Int(v) => Ok(F64(v as f64)),
            other => Err(format!("attribute `{key}` must be a number, got {other}")),
        }
    }
    fn bool_of(key: &str, a: Attr) -> Result<bool, String> {
        match a {
            Attr::Bool(v) => Ok(v),
            other => Err(format!(
                "attribute `{key}` must be true or false, got {other}"
            )),
        }
    }
    fn shape_of(key: &str, a: Attr) -> Result<Shape, String> {
        match a {
            Attr::Shape(s) => Ok(s),
            other => Err(format!("attribute `{key}` must be a shape, got {other}")),
        }
    }
    fn str_of(key: &str, a: Attr) -> Result<String, String> {
        match a {
            Attr::Str(s) => Ok(s),
            other => Err(format!("attribute `{key}` must be a string, got {other}")),
        }
    }
    if weight_name.is_some() && name != "weight" {
        return Err(format!("only `weight` takes an @name, not `{name}`"));
    }
    let op = match name {
        "input" | "state" => Op::Input {
            name: str_of("name", take("name")?)?,
            kind: if name == "input" {
                InputKind::Data
            } else {
                InputKind::State
            },
        },
        "weight" => Op::Weight {
            name: weight_name
                .ok_or_else(|| "`weight` needs a name: weight@model.layers.0...".to_string())?,
        },
        "scalar" => Op::Scalar {
            value: f64_of("value", take("value")?)?,
        },
        "rope.inv_freq" => Op::RopeInvFreq {
            head_dim: usize_of("head_dim", take("head_dim")?)? as u64,
            theta: f64_of("theta", take("theta")?)?,
        },
        "cast" => Op::Cast {
            to: match take("to")? {
                Attr::DType(d) => d,
                other => return Err(format!("attribute `to` must be a dtype, got {other}")),
            },
        },
        "argmax" => Op::Argmax {
            axis: i64_of("axis", take("axis")?)?,
        },
        "softmax" => Op::Softmax {
            axis: i64_of("axis", take("axis")?)?,
        },
        "matmul" => Op::MatMul,
        "linear" => Op::Linear,
        "embedding" => Op::Embedding,
        "cat" => Op::Cat {
            axis: i64_of("axis", take("axis")?)?,
        },
        "copy" => Op::Copy,
        "view.reshape" => Op::Reshape {
            shape: shape_of("shape", take("shape")?)?,
        },
        "view.expand" => Op::Expand {
            shape: shape_of("shape", take("shape")?)?,
        },
        "view.transpose" => Op::Transpose {
            a: usize_of("a", take("a")?)?,
            b: usize_of("b", take("b")?)?,
        },
        "view.slice" => Op::Slice {
            axis: i64_of("axis", take("axis")?)?,
            end: usize_of("end", take("end")?)? as u64,
            start: usize_of("start", take("start")?)? as u64,
        },
        "view.unsqueeze" => Op::Unsqueeze {
            axis: usize_of("axis", take("axis")?)?,
        },
        "dequant" => Op::Dequant {
            act: match take("act")? {
                Attr::DType(d) => d,
                other => return Err(format!("attribute `act` must be a dtype, got {other}")),
            },
            to: match take("to")? {
                Attr::DType(d) => d,
                other => return Err(format!("attribute `to` must be a dtype, got {other}")),
            },
        },
        "get" => Op::Get {
            index: usize_of("index", take("index")?)?,
        },
        other => {
            if let Some(u) = UnaryOp::ALL.iter().find(|u| Op::Unary(**u).name() == other) {
                Op::Unary(*u)
            } else if let Some(b) = BinaryOp::ALL
                .iter()
                .find(|b| Op::Binary(**b).name() == other)
            {
                Op::Binary(*b)
            } else if let Some(f) = FusedOp::ALL.iter().find(|f| f.name() == other) {
                Op::Fused(*f)
            } else if let Some(kind) = ReduceOp::ALL
                .iter()
                .find(|r| format!("reduce.{}", r.name()) == other)
            {
                Op::Reduce {
                    kind: *kind,
                    axis: i64_of("axis", take("axis")?)?,
                    keepdim: bool_of("keepdim", take("keepdim")?)?,
                }
            } else {
                return Err(format!("unknown op `{other}`"));
            }
        }
    };
    if let Some(key) = attrs.keys().next() {
        return Err(format!("`{name}` has no attribute `{key}`"));
    }
    Ok(op)
}
