//! The op enum and its attributes: what an op *is made of*. What an op *is* (its
//! name, arity, operand roles, how it executes) is stated once, in [`super::table`].

use std::fmt;

use crate::dtype::DType;
use crate::shape::Shape;

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
    /// The hyperbolic tangent (Gemma 2's soft-capping, `tanh(x / c) * c`).
    Tanh,
    /// GELU with the tanh approximation (Hendrycks & Gimpel, 2016), PyTorch's
    /// `gelu(x, approximate="tanh")`: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`,
    /// transformers' `gelu_pytorch_tanh` (Gemma's `hidden_activation`).
    GeluTanh,
}

impl UnaryOp {
    pub const ALL: [UnaryOp; 9] = [
        UnaryOp::Neg,
        UnaryOp::Rsqrt,
        UnaryOp::Sqrt,
        UnaryOp::Exp,
        UnaryOp::Silu,
        UnaryOp::Cos,
        UnaryOp::Sin,
        UnaryOp::Tanh,
        UnaryOp::GeluTanh,
    ];

    /// FLOPs charged per element (a transcendental counts as a few).
    pub const fn flops_per_element(self) -> u64 {
        match self {
            UnaryOp::Neg => 1,
            UnaryOp::Rsqrt | UnaryOp::Sqrt => 2,
            UnaryOp::Exp | UnaryOp::Cos | UnaryOp::Sin => 4,
            UnaryOp::Silu | UnaryOp::Tanh => 6,
            UnaryOp::GeluTanh => 10,
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
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::GeluTanh => gelu_tanh(x),
        }
    }
}

/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, the tanh approximation of GELU
/// as PyTorch's `GeluType::Tanh` kernel writes it (aten/src/ATen/native/cpu/
/// Activation.cpp: `kBeta = M_SQRT2 * M_2_SQRTPI * 0.5`, `kKappa = 0.044715`).
pub fn gelu_tanh(x: f64) -> f64 {
    let beta = std::f64::consts::SQRT_2 * std::f64::consts::FRAC_2_SQRT_PI * 0.5;
    let inner = beta * (x + 0.044715 * x * x * x);
    0.5 * x * (1.0 + inner.tanh())
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
    /// Llama 3's RoPE inverse frequencies, `f32[head_dim/2]`: those of
    /// [`Op::RopeInvFreq`] scaled by wavelength band, as transformers'
    /// `_compute_llama3_parameters` (modeling_rope_utils.py) computes them at load time
    /// (see [`crate::rope::llama3_inv_freq`]).
    RopeInvFreqLlama3 {
        theta: F64,
        head_dim: u64,
        factor: F64,
        low_freq_factor: F64,
        high_freq_factor: F64,
        original_max_position_embeddings: u64,
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
    /// that GEMV's activations: `fp8e4m3` quantizes each activation row to E4M3 per
    /// block of [`crate::numerics::FP8_ACT_BLOCK`] inputs, each block with a dynamic
    /// scale `absmax / 448`, multiplies the codes times their block's scale by the
    /// weight codes with f32 accumulation, and applies the weight's scale in the
    /// epilogue; `act == to` keeps activations unquantized.
    /// With integer codes (`i8`, `i4`, `u4`) the scales are the block format's side
    /// data (`crate::quant::IntFormat`: `f16 [out, in / 32]`, one per block of 32
    /// inputs for GGUF's Q8_0 and Q4_0, a scale and a minimum for Q4_1), and `act` is
    /// `i8`: the activations are quantized to 8 bits per block of 32 and each block's
    /// integer dot product is scaled by both blocks' scales, as llama.cpp's
    /// `ggml_vec_dot_q8_0_q8_0` does.
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
    /// `(x [..,D], w [D], eps[, r]) -> [r +] to(x.dtype)(w32 * x32 * rsqrt(mean(x32^2,
    /// -1) + eps))`: transformers' `Olmo2RMSNorm` (models/olmo2/modeling_olmo2.py),
    /// which multiplies by the weight in f32 before the cast, and with `r` the residual
    /// add after it, as OLMo 2's post-norm decoder layer applies it to each sublayer's
    /// output. For an f32 `x` it is [`FusedOp::RmsNorm`]'s value.
    PostRmsNorm,
    /// `(x, w, eps, c[, r]) -> [r +] to(x.dtype)(x32 * rsqrt(mean(x32^2, -1) + eps) *
    /// (w32 + c))`: transformers' `Gemma2RMSNorm` (models/gemma2/modeling_gemma2.py,
    /// and Gemma 3's), whose weight is an offset from `c = 1` and multiplies the f32
    /// values before the one cast back, with `r` the residual add after it (Gemma's
    /// post-norms before each residual add, `Gemma2DecoderLayer.forward`).
    OffsetRmsNorm,
    /// `(x, w, eps, W1, .., Wn)`: RMSNorm in the prologue of n GEMVs sharing it. One
    /// weight gives a tensor, several a tuple.
    RmsNormLinear,
    /// `(x, w, eps, c, W1, .., Wn)`: Gemma's RMSNorm ([`FusedOp::OffsetRmsNorm`]) in
    /// the prologue of n GEMVs sharing it (`input_layernorm` before q, k and v). One
    /// weight gives a tensor, several a tuple.
    OffsetRmsNormLinear,
    /// `(x, W1, .., Wn) -> (x @ W1^T, .., x @ Wn^T)`, n >= 2: GEMVs over one
    /// un-normalised input in one kernel (OLMo 2's q, k and v projections read the
    /// residual stream itself), a tuple.
    MultiLinear,
    /// `(x, Wg, Wu) -> silu(x @ Wg^T) * (x @ Wu^T)`.
    Swiglu,
    /// `(x, Wg, Wu) -> gelu_tanh(x @ Wg^T) * (x @ Wu^T)`: the gated MLP with GELU's
    /// tanh approximation (GeGLU, Shazeer, 2020), Gemma's `gelu_pytorch_tanh` gate.
    Geglu,
    /// `(x, w, eps, c, Wg, Wu)`: Gemma's RMSNorm then GeGLU in one kernel
    /// (`pre_feedforward_layernorm` and the gated MLP).
    OffsetRmsNormGeglu,
    /// `(x, w, eps, Wg, Wu)`: RMSNorm then SwiGLU in one kernel.
    RmsNormSwiglu,
    /// `(x, W, r) -> r + x @ W^T`: a GEMV with a residual-add epilogue.
    LinearAdd,
    /// `(x, W, c, r) -> r + c * (x @ W^T)`: a GEMV whose result is scaled by the
    /// scalar `c` before the residual add (Granite's `residual_multiplier`), each step
    /// rounded to the dtype as the eager multiply and add are.
    LinearScaleAdd,
    /// `(x, W, w, eps, r) -> post_rms_norm(x @ W^T, w, eps, r)`: a GEMV whose result,
    /// rounded to the dtype, is normalised as `Olmo2RMSNorm` does and added to the
    /// residual: OLMo 2's `o_proj` and `down_proj` with their post-norms
    /// (`Olmo2DecoderLayer.forward`). The norm reads the whole GEMV result.
    LinearPostRmsNorm,
    /// `(x, W, w, eps, c, r) -> offset_rms_norm(x @ W^T, w, eps, c, r)`: a GEMV whose
    /// result, rounded to the dtype, is normalised as `Gemma2RMSNorm` does and added to
    /// the residual: Gemma's `o_proj` and `down_proj` with their post-norms
    /// (`Gemma2DecoderLayer.forward`). The norm reads the whole GEMV result.
    LinearOffsetRmsNorm,
    /// `(q [B,H,T,hd], k [B,KV,L,hd], v [B,KV,L,hd], scale, mask [B,1,T,L]) ->
    /// softmax(q k^T * scale + mask) v`, with query head `h` reading KV head
    /// `h / (H/KV)` (GQA), computed with an online softmax.
    Attention,
    /// `(q, k, v, cos, sin, past_k, past_v, scale, mask) -> (out, k_all, v_all)`: RoPE
    /// on q and k, the KV append in place, and attention, in one kernel.
    DecodeAttention,
    /// `(q, k, v, cos, sin, past_k, past_v, scale, mask, c) -> (out, k_all, v_all)`:
    /// [`FusedOp::DecodeAttention`] with Gemma 2's soft-cap `tanh(s / c) * c` on the
    /// scaled scores before the mask (FP8 cache scales, when lowered, follow `c`).
    DecodeAttentionCapped,
    /// `(q [B,H,1,hd], k [B,KV,1,hd], v [B,KV,1,hd], k_pool [P,KV,BS,hd], v_pool
    /// [P,KV,BS,hd], block_table [B,M], positions [B,1], scale[, window]) -> (out,
    /// k_pool, v_pool)`: decode attention over a paged KV cache (Kwon et al. 2023,
    /// "Efficient Memory Management for Large Language Model Serving with
    /// PagedAttention", section 4.1). Sequence `b` is at position `p = positions[b]`:
    /// its rotated `k` and its `v` are written in place into slot `p mod BS` of block
    /// `block_table[b, p / BS]` of each pool, and its queries attend to its positions
    /// `0 ..= p` (with a sliding `window` `W`, to `p - W < j <= p`), read block by
    /// block through its row of the table. No mask: the table and the position say
    /// which entries a sequence sees, so sequences of one batch may have any lengths.
    PagedAttention,
    /// `(q, k, v, cos, sin, k_pool, v_pool, block_table, positions, scale[, window]) ->
    /// (out, k_pool, v_pool)`: RoPE on q and k, then [`FusedOp::PagedAttention`], in
    /// one kernel (the paged step's counterpart of [`FusedOp::DecodeAttention`]).
    PagedDecodeAttention,
}

impl FusedOp {
    pub const ALL: [FusedOp; 21] = [
        FusedOp::KvAppend,
        FusedOp::Rope,
        FusedOp::RmsNorm,
        FusedOp::PostRmsNorm,
        FusedOp::OffsetRmsNorm,
        FusedOp::RmsNormLinear,
        FusedOp::OffsetRmsNormLinear,
        FusedOp::MultiLinear,
        FusedOp::Swiglu,
        FusedOp::Geglu,
        FusedOp::OffsetRmsNormGeglu,
        FusedOp::RmsNormSwiglu,
        FusedOp::LinearAdd,
        FusedOp::LinearScaleAdd,
        FusedOp::LinearPostRmsNorm,
        FusedOp::LinearOffsetRmsNorm,
        FusedOp::Attention,
        FusedOp::DecodeAttention,
        FusedOp::DecodeAttentionCapped,
        FusedOp::PagedAttention,
        FusedOp::PagedDecodeAttention,
    ];
}

/// The axis `axis` of a rank-`rank` tensor, where a negative axis counts from the end
/// as in PyTorch (`-1` is the last).
pub fn resolve_axis(axis: i64, rank: usize) -> Result<usize, AxisError> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if (0..r).contains(&a) {
        Ok(a as usize)
    } else {
        Err(AxisError { axis, rank })
    }
}

/// An axis outside a tensor's rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("axis {axis} out of range for rank {rank}")]
pub struct AxisError {
    pub axis: i64,
    pub rank: usize,
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
            Op::RopeInvFreqLlama3 {
                theta,
                head_dim,
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => vec![
                ("factor", Attr::Float(factor.0)),
                ("head_dim", Attr::Int(*head_dim as i64)),
                ("high_freq_factor", Attr::Float(high_freq_factor.0)),
                ("low_freq_factor", Attr::Float(low_freq_factor.0)),
                (
                    "original_max_position_embeddings",
                    Attr::Int(*original_max_position_embeddings as i64),
                ),
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
}

/// Why an op token does not parse; `offset` is a byte offset into the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct OpParseError {
    pub offset: usize,
    pub message: String,
}
