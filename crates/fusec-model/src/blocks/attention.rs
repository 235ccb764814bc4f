//! Self-attention for one decode token, as transformers' `LlamaAttention.forward` runs
//! it with `eager_attention_forward`: q/k/v projections split into heads, RoPE, the KV
//! cache grown by `cat` (a copy of the whole cache, as `DynamicCache.update` does),
//! `repeat_kv` for grouped-query attention (Ainslie et al., 2023), `QK^T` scaled by
//! `head_dim^-0.5`, the additive mask, softmax in f32, `PV`, and `o_proj`.
//!
//! A layer with a sliding window of `W` positions (Mistral; Gemma 2/3's and Qwen2's
//! `sliding_attention` layers) attends only to the keys at positions `p - W < k <= p`
//! (transformers' `sliding_window_overlay` in masking_utils.py). Its cache keeps just
//! those: a ring of `min(S, W)` entries ([`fusec_ir::Dim::Window`]) into which
//! `kv.append` writes the step's entry at slot `S mod W`, overwriting the one that
//! left the window. RoPE is applied before caching, so the order of the slots changes
//! no score, only the summation order of softmax and `PV`; every slot is inside the
//! window, so the layer's mask ([`layer_mask`]) masks none of them. transformers'
//! `DynamicSlidingWindowLayer` keeps the last `W - 1` entries and concatenates the
//! new one, which attends to the same `W` keys.

use fusec_ir::{
    step, BinaryOp, DType, Dim, FusedOp, InputKind, NodeId, Op, OutputKind, Shape, TensorType,
    UnaryOp, WeightRole,
};

use super::linear::Linear;
use super::rope::RopeTables;
use super::step::StepDims;
use crate::build::{BuildError, Builder};
use crate::frontend::ModelConfig;

/// The head layout of an attention layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub num_heads: u64,
    pub num_kv_heads: u64,
    pub head_dim: u64,
}

impl Heads {
    pub fn of(cfg: &ModelConfig) -> Self {
        Self {
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        }
    }

    /// Query heads per KV head (the GQA group size).
    pub fn group_size(&self) -> u64 {
        self.num_heads / self.num_kv_heads
    }
}

/// One layer's self-attention block, from the normalised hidden state to `o_proj`'s
/// output (the caller adds the residual).
#[derive(Clone, Debug, PartialEq)]
pub struct Attention {
    pub layer: u64,
    pub hidden_size: u64,
    pub heads: Heads,
    /// The weights' dtype (the checkpoint's).
    pub dtype: DType,
    /// Biases on the q, k and v projections (Qwen2 has them; transformers' Llama
    /// `attention_bias` puts one on `o_proj` too).
    pub qkv_bias: bool,
    pub o_bias: bool,
    /// The sliding window of this layer in positions; `None`: the whole cache.
    pub window: Option<u64>,
}

impl Attention {
    /// Llama's attention at `layer`: no biases.
    pub fn llama(cfg: &ModelConfig, layer: u64) -> Self {
        Self {
            layer,
            hidden_size: cfg.hidden_size,
            heads: Heads::of(cfg),
            dtype: cfg.dtype,
            qkv_bias: false,
            o_bias: false,
            window: cfg.layer_window(layer),
        }
    }

    /// A projection of this layer, `self_attn.<module>`.
    pub fn projection(
        &self,
        b: &mut Builder,
        module: &str,
        role: WeightRole,
        out_features: u64,
        in_features: u64,
        bias: bool,
    ) -> Result<Linear, BuildError> {
        let module = format!("self_attn.{module}");
        let p = Linear::new(
            b,
            &step::layer_weight(self.layer, &module),
            role,
            self.dtype,
            out_features,
            in_features,
        )?;
        if bias {
            p.with_bias(b, &step::layer_bias(self.layer, &module))
        } else {
            Ok(p)
        }
    }

    /// `x` `[B,T,hidden]` to the attention output `[B,T,hidden]`.
    pub fn forward(
        &self,
        b: &mut Builder,
        x: NodeId,
        rope: &RopeTables,
        mask: NodeId,
        dims: &StepDims,
    ) -> Result<NodeId, BuildError> {
        let Heads {
            num_heads: h,
            num_kv_heads: kv,
            head_dim: hd,
        } = self.heads;
        let d = self.hidden_size;
        let mut qkv = Vec::with_capacity(3);
        for (module, role, count) in [
            ("q_proj", WeightRole::Query, h),
            ("k_proj", WeightRole::Key, kv),
            ("v_proj", WeightRole::Value, kv),
        ] {
            let p = self.projection(b, module, role, count * hd, d, self.qkv_bias)?;
            let y = p.forward(b, x)?;
            qkv.push(split_heads(b, y, count, hd, dims)?);
        }
        let (q, k, v) = (qkv[0], qkv[1], qkv[2]);
        let (q, k) = rope.apply(b, q, k)?;
        let scores = Scores {
            scale: (hd as f64).powf(-0.5),
            softcap: None,
            window: self.window,
        };
        let o = attend(b, self.layer, (q, k, v), mask, &self.heads, dims, &scores)?;
        let o_proj = self.projection(b, "o_proj", WeightRole::AttnOut, d, h * hd, self.o_bias)?;
        o_proj.forward(b, o)
    }
}

/// A layer's attention after RoPE: the cache append, the layer's mask and
/// [`eager_attention_with`] for dense caches, or [`paged_attention`] when `dims` is a
/// paged step (where `mask` is not read).
pub fn attend(
    b: &mut Builder,
    layer: u64,
    (q, k, v): (NodeId, NodeId, NodeId),
    mask: NodeId,
    heads: &Heads,
    dims: &StepDims,
    scores: &Scores,
) -> Result<NodeId, BuildError> {
    if dims.paged.is_some() {
        return paged_attention(b, layer, (q, k, v), heads, dims, scores);
    }
    let (k_all, v_all) = kv_cache_append(b, layer, k, v, scores.window, dims)?;
    let mask = layer_mask(b, mask, scores.window, dims)?;
    eager_attention_with(b, q, k_all, v_all, mask, heads, dims, scores)
}

/// Decode attention over a paged KV cache (see [`StepDims::paged`]): the rotated `q`
/// `[B,H,1,hd]`, `k` and `v` `[B,KV,1,hd]` into one `fused.paged_attention`, which
/// writes the new entries into layer `layer`'s pools (state `past.L.key` and
/// `past.L.value`, `[P,KV,BS,hd]`, returned as the state outputs of the same names)
/// and attends over the sequence's blocks, to `[B,1,H*hd]`.
///
/// No eager composition of primitives can write through a block table, so the eager
/// graph already holds the fused op, as it holds `kv.append` for a sliding window's
/// ring; the rules fuse everything around it as in the dense step. The scores are
/// those of [`eager_attention_with`] (scale, then softmax in f32); a soft-cap is not
/// supported.
pub fn paged_attention(
    b: &mut Builder,
    layer: u64,
    (q, k, v): (NodeId, NodeId, NodeId),
    heads: &Heads,
    dims: &StepDims,
    scores: &Scores,
) -> Result<NodeId, BuildError> {
    let Some(block_size) = dims.paged else {
        return Err(BuildError::Unsupported("not a paged step".into()));
    };
    if scores.softcap.is_some() {
        return Err(BuildError::Unsupported(
            "a paged KV cache with soft-capped attention scores".into(),
        ));
    }
    let dtype = b.ty(k).dtype;
    let pool = TensorType::new(
        dtype,
        Shape(vec![
            Dim::sym(step::POOL_BLOCKS),
            Dim::Fixed(heads.num_kv_heads),
            Dim::Fixed(block_size),
            Dim::Fixed(heads.head_dim),
        ]),
    );
    let pool_k = b.input(&step::past_key(layer), InputKind::State, pool.clone())?;
    let pool_v = b.input(&step::past_value(layer), InputKind::State, pool)?;
    let table_name = match scores.window {
        Some(w) => step::window_block_table(w),
        None => step::BLOCK_TABLE.to_string(),
    };
    let table = b.shared_input(
        &table_name,
        TensorType::new(DType::I32, super::step::paged_table_shape(dims)),
    )?;
    let ids = TensorType::new(DType::I32, Shape(vec![dims.batch.clone(), Dim::Fixed(1)]));
    let positions = b.shared_input(step::POSITION_IDS, ids)?;
    let scale = b.scalar(scores.scale)?;
    let mut operands = vec![q, k, v, pool_k, pool_v, table, positions, scale];
    if let Some(w) = scores.window {
        operands.push(b.scalar(w as f64)?);
    }
    let t = b.op(Op::Fused(FusedOp::PagedAttention), &operands)?;
    for (index, name) in [(1, step::past_key(layer)), (2, step::past_value(layer))] {
        let pool = b.op(Op::Get { index }, &[t])?;
        b.output(&name, OutputKind::State, pool);
    }
    let o = b.op(Op::Get { index: 0 }, &[t])?;
    let o = b.transpose(o, 1, 2)?;
    b.reshape(
        o,
        Shape(vec![
            dims.batch.clone(),
            dims.query_len(),
            Dim::Fixed(heads.num_heads * heads.head_dim),
        ]),
    )
}

/// `x.view(B, T, heads, head_dim).transpose(1, 2)`: `[B,T,heads*hd]` to
/// `[B,heads,T,hd]`.
pub fn split_heads(
    b: &mut Builder,
    x: NodeId,
    heads: u64,
    head_dim: u64,
    dims: &StepDims,
) -> Result<NodeId, BuildError> {
    let y = b.reshape(
        x,
        Shape(vec![
            dims.batch.clone(),
            dims.query_len(),
            Dim::Fixed(heads),
            Dim::Fixed(head_dim),
        ]),
    )?;
    b.transpose(y, 1, 2)
}

/// `DynamicCache.update`: appends this step's k and v `[B,KV,1,hd]` to layer
/// `layer`'s caches (state inputs `past.L.key`/`past.L.value` `[B,KV,S,hd]`, state
/// outputs of the same names `[B,KV,S+1,hd]`) with `torch.cat` along the sequence.
///
/// With a sliding `window` of `W` positions the caches are rings of `[B,KV,min(S,W),hd]`
/// (`[B,KV,min(S+1,W),hd]` after the step) and the entry is written by `kv.append`
/// at slot `S mod W` (see the module documentation): no `cat` can express a ring.
///
/// A prefill step appends its `T` entries the same way (the ring's `T` entries go to
/// slots `S .. S+T-1 mod W`). Its queries, though, attend to the keys that were in the
/// cache before the step as well as to all `T` new ones, which a ring of `W` may no
/// longer hold together; transformers' `DynamicSlidingWindowLayer.update` attends to
/// `cat(past, new)` and keeps only the last entries. So for `T > 1` the returned keys
/// and values are `cat(past, new)`, `[B,KV,min(S,W)+T,hd]`, whose positions the
/// window's mask ([`layer_mask`]) restricts per query, and the state output is the
/// ring after `kv.append`.
pub fn kv_cache_append(
    b: &mut Builder,
    layer: u64,
    k: NodeId,
    v: NodeId,
    window: Option<u64>,
    dims: &StepDims,
) -> Result<(NodeId, NodeId), BuildError> {
    if dims.paged.is_some() {
        // A family that appends to dense caches itself has no paged attention yet.
        return Err(BuildError::Unsupported(
            "a paged KV cache for this family's attention (see blocks::attend)".into(),
        ));
    }
    let mut all = [k, v];
    for (slot, name) in all
        .iter_mut()
        .zip([step::past_key(layer), step::past_value(layer)])
    {
        let new = b.ty(*slot);
        let mut shape = new.shape.clone();
        if let Some(seq) = shape.0.get_mut(2) {
            *seq = match window {
                Some(w) => dims.past.windowed(w),
                None => dims.past.clone(),
            };
        }
        let past = b.input(&name, InputKind::State, TensorType::new(new.dtype, shape))?;
        let append = match window {
            Some(_) => Op::Fused(FusedOp::KvAppend),
            None => Op::Cat { axis: -2 },
        };
        let all = b.op(append, &[past, *slot])?;
        b.output(&name, OutputKind::State, all);
        *slot = match (window, dims.query) {
            (Some(_), t) if t > 1 => b.op(Op::Cat { axis: -2 }, &[past, *slot])?,
            _ => all,
        };
    }
    Ok((all[0], all[1]))
}

/// The additive mask of a layer: the step's `attention_mask` `[B,1,T,S+T]`, or for a
/// layer with a sliding window of `W` positions the window's mask
/// [`step::window_mask`], one entry per key [`kv_cache_append`] returns (a step input
/// shared by every layer with that window): `[B,1,1,min(S+1,W)]` at decode, one per
/// slot of the ring; `[B,1,T,min(S,W)+T]` for a prefill step, the ring before the
/// step and then the new tokens.
pub fn layer_mask(
    b: &mut Builder,
    mask: NodeId,
    window: Option<u64>,
    dims: &StepDims,
) -> Result<NodeId, BuildError> {
    let Some(w) = window else {
        return Ok(mask);
    };
    let mut ty = b.ty(mask);
    if let Some(last) = ty.shape.0.last_mut() {
        *last = match dims.query {
            1 => dims.kv_len().windowed(w),
            t => dims.past.windowed(w).plus(t),
        };
    }
    b.shared_input(&step::window_mask(w), ty)
}

/// `repeat_kv`: `[B,KV,S+1,hd]` to `[B,H,S+1,hd]`, nothing when `H == KV`.
pub fn repeat_kv(
    b: &mut Builder,
    x: NodeId,
    heads: &Heads,
    dims: &StepDims,
) -> Result<NodeId, BuildError> {
    let n_rep = heads.group_size();
    if n_rep == 1 {
        return Ok(x);
    }
    // The cache's length: `S+1`, or `min(S+1,W)` for a sliding window's ring.
    let len = b
        .ty(x)
        .shape
        .0
        .get(2)
        .cloned()
        .unwrap_or_else(|| dims.kv_len());
    let (bd, kv, hd) = (
        dims.batch.clone(),
        Dim::Fixed(heads.num_kv_heads),
        Dim::Fixed(heads.head_dim),
    );
    let e = b.op(Op::Unsqueeze { axis: 2 }, &[x])?;
    let e = b.op(
        Op::Expand {
            shape: Shape(vec![
                bd.clone(),
                kv,
                Dim::Fixed(n_rep),
                len.clone(),
                hd.clone(),
            ]),
        },
        &[e],
    )?;
    // reshape of an expanded tensor cannot be a view: PyTorch copies.
    let e = b.op(Op::Copy, &[e])?;
    b.reshape(e, Shape(vec![bd, Dim::Fixed(heads.num_heads), len, hd]))
}

/// `tanh(x / c) * c`: Gemma 2's soft-capping of attention scores and final logits
/// (transformers' models/gemma2/modeling_gemma2.py).
pub fn soft_cap(b: &mut Builder, x: NodeId, c: f64) -> Result<NodeId, BuildError> {
    let x = b.binary_scalar(BinaryOp::Div, x, c)?;
    let x = b.unary(UnaryOp::Tanh, x)?;
    b.binary_scalar(BinaryOp::Mul, x, c)
}

/// `eager_attention_forward` and the head merge: q `[B,H,T,hd]` against the whole
/// caches `[B,KV,S+T,hd]`, to `[B,T,H*hd]`.
pub fn eager_attention(
    b: &mut Builder,
    q: NodeId,
    k_all: NodeId,
    v_all: NodeId,
    mask: NodeId,
    heads: &Heads,
    dims: &StepDims,
) -> Result<NodeId, BuildError> {
    let scale = (heads.head_dim as f64).powf(-0.5);
    eager_attention_scaled(b, q, k_all, v_all, mask, heads, dims, scale)
}

/// [`eager_attention`] with the scores multiplied by `scale` instead of
/// `head_dim^-0.5` (Granite's `attention_multiplier`, transformers'
/// models/granite/modeling_granite.py `GraniteAttention.scaling`).
#[allow(clippy::too_many_arguments)]
pub fn eager_attention_scaled(
    b: &mut Builder,
    q: NodeId,
    k_all: NodeId,
    v_all: NodeId,
    mask: NodeId,
    heads: &Heads,
    dims: &StepDims,
    scale: f64,
) -> Result<NodeId, BuildError> {
    let scores = Scores {
        scale,
        softcap: None,
        window: None,
    };
    eager_attention_with(b, q, k_all, v_all, mask, heads, dims, &scores)
}

/// How one layer forms its attention scores: the scale, an optional soft-cap, and the
/// layer's sliding window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scores {
    /// The factor on `q k^T` (`head_dim^-0.5`, Granite's `attention_multiplier`,
    /// Gemma's `query_pre_attn_scalar^-0.5`).
    pub scale: f64,
    /// Gemma 2's `attn_logit_softcapping` `c`: `scores = tanh(scores / c) * c` before
    /// the mask (transformers' models/gemma2/modeling_gemma2.py,
    /// `eager_attention_forward`).
    pub softcap: Option<f64>,
    /// The layer's sliding window (`ModelConfig::layer_window`), which its caller
    /// gives [`kv_cache_append`] and [`layer_mask`]: the caches are then rings of
    /// `min(S+1,W)` entries and the mask the window's, and the scores follow their
    /// shapes.
    pub window: Option<u64>,
}

/// `eager_attention_forward` with `scores`' scale and soft-cap, and the head merge:
/// q `[B,H,1,hd]` against the whole caches `[B,KV,S+1,hd]`, to `[B,1,H*hd]`.
#[allow(clippy::too_many_arguments)]
pub fn eager_attention_with(
    b: &mut Builder,
    q: NodeId,
    k_all: NodeId,
    v_all: NodeId,
    mask: NodeId,
    heads: &Heads,
    dims: &StepDims,
    scores_spec: &Scores,
) -> Result<NodeId, BuildError> {
    let dtype = b.ty(q).dtype;
    let k_all = repeat_kv(b, k_all, heads, dims)?;
    let v_all = repeat_kv(b, v_all, heads, dims)?;
    let kt = b.transpose(k_all, 2, 3)?;
    let scores = b.op(Op::MatMul, &[q, kt])?;
    let mut scores = b.binary_scalar(BinaryOp::Mul, scores, scores_spec.scale)?;
    if let Some(c) = scores_spec.softcap {
        scores = soft_cap(b, scores, c)?;
    }
    let scores = b.binary(BinaryOp::Add, scores, mask)?;
    let scores = b.to_dtype(scores, DType::F32)?;
    let probs = b.op(Op::Softmax { axis: -1 }, &[scores])?;
    let probs = b.to_dtype(probs, dtype)?;
    let o = b.op(Op::MatMul, &[probs, v_all])?;
    let o = b.transpose(o, 1, 2)?;
    // `attn_output.transpose(1, 2).contiguous()`: a copy once there is more than one
    // position (for one, the transposed tensor is already contiguous and PyTorch
    // copies nothing).
    let o = match dims.query {
        1 => o,
        _ => b.op(Op::Copy, &[o])?,
    };
    b.reshape(
        o,
        Shape(vec![
            dims.batch.clone(),
            dims.query_len(),
            Dim::Fixed(heads.num_heads * heads.head_dim),
        ]),
    )
}
