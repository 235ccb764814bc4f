//! The interface between the backend-neutral lowering (`lower.rs`) and a kernel
//! emitter: the operands the lowering resolves, the pointer parameters a kernel binds,
//! what an emitter returns, and [`KernelEmitter`], one method per kernel family.
//!
//! The split follows tinygrad's renderer and naga's `back/<lang>/writer.rs`: the
//! lowering decides buffers, in-place aliases, views, arena placement and the launch
//! plan once for every backend; an emitter only turns one node's resolved views into
//! the text of one kernel and its launch shape. [`crate::cuda::Cuda`] is the first
//! implementation.

use fusec_ir::{BinaryOp, DType, ReduceOp, UnaryOp};

use crate::layout::View;
use crate::options::{DecodeShape, Options};
use crate::plan::{Access, Arg, BufferId};

/// The placeholder for the kernel's name in a generated body; the name is given once
/// identical kernels have been merged.
pub(crate) const NAME: &str = "FUSEC_KERNEL_NAME";

/// An operand of a kernel, as the lowering resolved it.
#[derive(Clone, Debug)]
pub(crate) enum Operand {
    /// A tensor in a buffer.
    View(View),
    /// A scalar kernel argument, baked in as a literal.
    Scalar(f32),
    /// A quantized weight: `values * scale` (per output channel, or one per tensor),
    /// read by GEMV kernels only. `act` is the recipe of the GEMV's activations.
    Dequant {
        values: View,
        scale: View,
        to: DType,
        act: DType,
    },
}

impl Operand {
    pub fn view(&self) -> Result<&View, String> {
        match self {
            Operand::View(v) => Ok(v),
            Operand::Scalar(_) => Err("expected a tensor operand, got a scalar".into()),
            Operand::Dequant { .. } => Err("a quantized weight can only feed a GEMV".into()),
        }
    }

    pub fn scalar(&self) -> Result<f32, String> {
        match self {
            Operand::Scalar(v) => Ok(*v),
            _ => Err("expected a scalar operand".into()),
        }
    }

    /// Operand `i` of `ops` as a tensor.
    pub fn view_at(ops: &[Operand], i: usize) -> Result<&View, String> {
        ops.get(i)
            .ok_or_else(|| format!("missing operand {i}"))?
            .view()
    }

    /// Operand `i` of `ops` as a scalar.
    pub fn scalar_at(ops: &[Operand], i: usize) -> Result<f32, String> {
        ops.get(i)
            .ok_or_else(|| format!("missing operand {i}"))?
            .scalar()
    }

    /// The dtype of the values the operand stands for.
    pub fn dtype(&self) -> DType {
        match self {
            Operand::View(v) => v.dtype,
            Operand::Scalar(_) => DType::F32,
            Operand::Dequant { to, .. } => *to,
        }
    }
}

/// The pointer parameters of a kernel, in order of first use.
#[derive(Debug, Default)]
pub(crate) struct Params {
    list: Vec<(BufferId, DType, Access)>,
}

impl Params {
    /// The parameter that points at `view`'s buffer, registering it on first use.
    pub fn bind(&mut self, view: &View, access: Access) -> String {
        self.bind_buffer(view.buffer, view.dtype, access)
    }

    pub fn bind_buffer(&mut self, buffer: BufferId, dtype: DType, access: Access) -> String {
        if let Some(i) = self.list.iter().position(|(b, _, _)| *b == buffer) {
            let a = &mut self.list[i].2;
            if *a != access {
                *a = Access::ReadWrite;
            }
            return format!("p{i}");
        }
        self.list.push((buffer, dtype, access));
        format!("p{}", self.list.len() - 1)
    }

    /// The pointer parameters in order: buffer, stored dtype, and how the kernel uses it.
    pub fn list(&self) -> &[(BufferId, DType, Access)] {
        &self.list
    }

    /// The plan's arguments, in parameter order.
    pub fn args(&self) -> Vec<Arg> {
        let mut args: Vec<Arg> = self
            .list
            .iter()
            .map(|(b, _, a)| Arg::Buffer {
                buffer: *b,
                access: *a,
            })
            .collect();
        args.push(Arg::PastLen);
        args
    }
}

/// What a family generator returns: the function body and how to launch it.
#[derive(Debug)]
pub(crate) struct KernelCode {
    /// A short family name for the kernel's name (`gemv`, `softmax`).
    pub family: &'static str,
    /// The statements of the function body.
    pub body: String,
    pub grid: [u32; 3],
    pub block: u32,
    /// Dynamic shared memory bytes.
    pub shared: u32,
}

/// What the kernel does with the dot products.
pub(crate) enum Epilogue<'a> {
    /// One output per weight.
    Plain,
    /// Two weights, gate and up: `act(x Wg^T) * (x Wu^T)` (SwiGLU with `silu`, GeGLU
    /// with `gelu_tanh`).
    Gated(fusec_ir::UnaryOp),
    /// One weight: `r + x W^T`.
    Residual(&'a View),
    /// One weight: `r + c * (x W^T)`, each step rounded to the dtype.
    ScaledResidual(&'a View, f32),
    /// One weight: `r + to(T)(w * (y * rsqrt(mean(y^2) + eps)))` of the rounded
    /// result `y` (OLMo 2's post-norm). The norm needs the whole result: every block
    /// writes its rows, and the block that finishes last, known by an atomic ticket,
    /// normalises them in place and resets the ticket.
    PostNorm {
        weight: &'a View,
        eps: f32,
        /// Gemma's weight offset (the values times `w + c`, `Gemma2RMSNorm`); `None`:
        /// OLMo 2's `w`.
        offset: Option<f32>,
        residual: &'a View,
        ticket: &'a View,
    },
}

/// A GEMV node's operands.
pub(crate) struct Gemv<'a> {
    pub x: &'a View,
    /// The RMSNorm of a normalised prologue.
    pub norm: Option<NormPrologue<'a>>,
    pub weights: Vec<&'a Operand>,
    pub epilogue: Epilogue<'a>,
    pub outs: &'a [View],
}

/// The RMSNorm in a GEMV's prologue: Llama's (`offset` `None`: `w * to(T)(x * r)`,
/// rounded twice) or Gemma's (`to(T)((x * r) * (w + c))` in f32, rounded once).
#[derive(Clone, Copy)]
pub(crate) struct NormPrologue<'a> {
    pub weight: &'a View,
    pub eps: f32,
    pub offset: Option<f32>,
}

/// A decode attention's operands beyond plain attention's.
pub(crate) struct Decode<'a> {
    pub cos: &'a Operand,
    pub sin: &'a Operand,
    pub past_k: &'a View,
    pub past_v: &'a View,
    /// Per-tensor scales of an FP8 cache.
    pub scales: Option<(&'a View, &'a View)>,
}

/// A paged attention's operands beyond plain attention's (`fused.paged_attention`,
/// and `fused.paged_decode_attention` with its RoPE tables): the pools `[P, KV, BS,
/// hd]`, each row's block table row `[B, M]` and position `[B, 1]` (i32).
pub(crate) struct Paged<'a> {
    pub pool_k: &'a View,
    pub pool_v: &'a View,
    pub table: &'a View,
    pub positions: &'a View,
    /// RoPE's cos and sin tables, applied to q and the new k.
    pub rope: Option<(&'a Operand, &'a Operand)>,
    /// A sliding window, in positions.
    pub window: Option<u64>,
}

/// An attention node's operands. For decode and paged attention, `k` and `v` are the
/// new entries.
pub(crate) struct Attention<'a> {
    pub q: &'a View,
    pub k: &'a View,
    pub v: &'a View,
    pub decode: Option<Decode<'a>>,
    /// Attention through a paged cache's block tables (then `decode` is `None` and the
    /// mask is the scalar 0: a row sees exactly its positions).
    pub paged: Option<Paged<'a>>,
    pub scale: f32,
    /// Gemma 2's soft-cap `c` of the scaled scores, `tanh(s / c) * c`, if any.
    pub softcap: Option<f32>,
    pub mask: &'a Operand,
    pub out: &'a View,
}

/// What every kernel family method receives besides its operands: the kernel's pointer
/// parameters (bound as the body is written), the decode shape and the options.
pub(crate) struct Ctx<'a, 'p> {
    pub params: &'p mut Params,
    pub decode: &'a DecodeShape,
    pub opts: &'a Options,
}

/// A backend's kernel emitter: one method per kernel family, called by the lowering
/// with the node's resolved operands and result views. Each returns the kernel body
/// (with [`NAME`] for its name) and its launch shape, or why it cannot be built.
pub(crate) trait KernelEmitter {
    /// Helpers emitted once at the top of the translation unit.
    fn prelude(&self) -> &'static str;
    /// The source type that stores `dtype`.
    fn type_name(&self, dtype: DType) -> &'static str;
    /// The whole kernel function for `code` with `params`, named [`NAME`]; kernels of
    /// identical text are merged by the lowering.
    fn function(&self, code: &KernelCode, params: &Params) -> String;

    fn unary(
        &self,
        op: UnaryOp,
        x: &Operand,
        out: &View,
        cx: Ctx<'_, '_>,
    ) -> Result<KernelCode, String>;
    fn binary(
        &self,
        op: BinaryOp,
        a: &Operand,
        b: &Operand,
        out: &View,
        cx: Ctx<'_, '_>,
    ) -> Result<KernelCode, String>;
    fn cast(&self, x: &Operand, out: &View, cx: Ctx<'_, '_>) -> Result<KernelCode, String>;
    fn copy(&self, x: &Operand, out: &View, cx: Ctx<'_, '_>) -> Result<KernelCode, String>;
    /// `axis` is resolved; `keepdim` as in the IR.
    fn reduce(
        &self,
        kind: ReduceOp,
        x: &View,
        axis: (usize, bool),
        out: &View,
        cx: Ctx<'_, '_>,
    ) -> Result<KernelCode, String>;
    fn argmax(
        &self,
        x: &View,
        axis: usize,
        out: &View,
        cx: Ctx<'_, '_>,
    ) -> Result<KernelCode, String>;
    fn softmax(
        &self,
        x: &View,
        axis: usize,
        out: &View,
        cx: Ctx<'_, '_>,
    ) -> Result<KernelCode, String>;
    fn matmul(&self, a: &View, b: &View, out: &View, cx: Ctx<'_, '_>)
        -> Result<KernelCode, String>;
    fn embedding(
        &self,
        table: &View,
        ids: &View,
        out: &View,
        cx: Ctx<'_, '_>,
    ) -> Result<KernelCode, String>;
    fn cat(
        &self,
        parts: &[View],
        axis: usize,
        out: &View,
        cx: Ctx<'_, '_>,
    ) -> Result<KernelCode, String>;
    /// Appends the new entry to the cache in place (the cache is the node's result).
    fn kv_append(&self, past: &View, new: &View, cx: Ctx<'_, '_>) -> Result<KernelCode, String>;
    fn rms_norm(
        &self,
        x: &View,
        weight: &View,
        eps: f32,
        out: &View,
        cx: Ctx<'_, '_>,
    ) -> Result<KernelCode, String>;
    /// `Olmo2RMSNorm` (the weight applied in f32 before the cast), then `+ residual`
    /// when there is one; with an `offset` `c`, Gemma's (`Gemma2RMSNorm`: the values
    /// times `w + c` in f32).
    #[allow(clippy::too_many_arguments)]
    fn post_rms_norm(
        &self,
        x: &View,
        weight: &View,
        eps: f32,
        offset: Option<f32>,
        residual: Option<&View>,
        out: &View,
        cx: Ctx<'_, '_>,
    ) -> Result<KernelCode, String>;
    fn rope(
        &self,
        x: &View,
        cos: &Operand,
        sin: &Operand,
        out: &View,
        cx: Ctx<'_, '_>,
    ) -> Result<KernelCode, String>;
    /// The GEMV family: `linear` and every fused op built on it (norm prologue,
    /// SwiGLU or residual epilogue, FP8 weights).
    fn gemv(&self, g: &Gemv<'_>, cx: Ctx<'_, '_>) -> Result<KernelCode, String>;
    /// The split-KV workspace an attention kernel needs, as (partial floats, tickets),
    /// or `None`; asked before [`KernelEmitter::attention`] so that the lowering can
    /// place the shared workspace.
    fn attention_workspace(
        &self,
        a: &Attention<'_>,
        decode: &DecodeShape,
        opts: &Options,
    ) -> Result<Option<(u64, u64)>, String>;
    /// The dtype of the workspace's partials.
    fn workspace_dtype(&self) -> DType;
    /// Writes a paged step's new keys and values (`a.k`, `a.v`, rotated when
    /// `paged.rope` is set) into their blocks of the pools; launched before the paged
    /// [`KernelEmitter::attention`] of the same node.
    fn paged_write(&self, a: &Attention<'_>, cx: Ctx<'_, '_>) -> Result<KernelCode, String>;
    /// Attention (plain, decode or paged), with the workspace views where one was
    /// asked for.
    fn attention(
        &self,
        a: &Attention<'_>,
        workspace: Option<(&View, &View)>,
        cx: Ctx<'_, '_>,
    ) -> Result<KernelCode, String>;
}
