//! The eager decode step of a Llama-architecture model, op for op as Hugging Face
//! transformers' `LlamaForCausalLM` runs it with eager attention (GUIDE §2, §6):
//!
//! - RMSNorm as `to(f32)`, `pow`, `mean`, `add eps`, `rsqrt`, `mul`, `to(dtype)`,
//!   `mul weight` (the casts vanish for an f32 checkpoint);
//! - RoPE tables once per step (`inv_freq @ positions`, `cat`, `cos`, `sin`, scaling),
//!   applied with `rotate_half` (`slice`, `neg`, `cat`, `mul`, `add`);
//! - the KV cache grown by `cat` (a copy of the whole cache, as `DynamicCache` does);
//! - `repeat_kv` for GQA (`expand` then a copying `reshape`);
//! - `QK^T`, scale, additive mask, softmax in f32, `PV`, `o_proj`, residual adds;
//! - SwiGLU MLP, final norm, `lm_head`, and the greedy `argmax`.
//!
//! One token per sequence: `B` sequences, each with `S` cached positions. The additive
//! attention mask `[B,1,1,S+1]` is an input, built by the caller once per step.

use crate::build::builder::{BuildError, Builder};
use crate::dtype::DType;
use crate::frontend::ModelConfig;
use crate::graph::{Graph, NodeId, OutputKind};
use crate::op::{BinaryOp, InputKind, Op, ReduceOp, UnaryOp, F64};
use crate::shape::{Dim, Shape};
use crate::step;
use crate::types::TensorType;

fn shape(dims: &[Dim]) -> Shape {
    Shape(dims.to_vec())
}

/// Builds the eager decode step of `cfg` in its checkpoint dtype.
pub fn eager_decode_graph(cfg: &ModelConfig) -> Result<Graph, BuildError> {
    Llama::new(cfg).build()
}

struct Llama<'a> {
    cfg: &'a ModelConfig,
    b: Builder,
    dt: DType,
    batch: Dim,
    past: Dim,
}

impl<'a> Llama<'a> {
    fn new(cfg: &'a ModelConfig) -> Self {
        let mut b = Builder::new(&cfg.name);
        b.graph_mut()
            .attrs
            .insert("layers".into(), cfg.num_layers.to_string());
        Self {
            cfg,
            b,
            dt: cfg.dtype,
            batch: Dim::sym(step::BATCH),
            past: Dim::sym(step::PAST),
        }
    }

    fn d(&self, v: u64) -> Dim {
        Dim::Fixed(v)
    }

    fn build(mut self) -> Result<Graph, BuildError> {
        let cfg = self.cfg;
        let (bd, one) = (self.batch.clone(), Dim::Fixed(1));
        let ids = self.b.input(
            step::INPUT_IDS,
            InputKind::Data,
            TensorType::new(DType::I32, shape(&[bd.clone(), one.clone()])),
        )?;
        let pos = self.b.input(
            step::POSITION_IDS,
            InputKind::Data,
            TensorType::new(DType::I32, shape(&[bd.clone(), one.clone()])),
        )?;
        let mask = self.b.input(
            step::ATTENTION_MASK,
            InputKind::Data,
            TensorType::new(
                self.dt,
                shape(&[bd.clone(), one.clone(), one.clone(), self.past.plus(1)]),
            ),
        )?;

        let embed = self.b.weight(
            step::EMBED,
            self.dt,
            Shape::fixed(&[cfg.vocab_size, cfg.hidden_size]),
        )?;
        let mut x = self.b.op(Op::Embedding, &[embed, ids])?;
        let (cos, sin) = self.rope_tables(pos)?;

        for layer in 0..cfg.num_layers {
            self.b.set_layer(Some(layer as u32));
            x = self.layer(layer, x, cos, sin, mask)?;
        }
        self.b.set_layer(None);

        let w = self
            .b
            .weight(step::FINAL_NORM, self.dt, Shape::fixed(&[cfg.hidden_size]))?;
        let h = self.rms_norm(x, w)?;
        let head = if cfg.tie_word_embeddings {
            embed
        } else {
            self.b.weight(
                step::LM_HEAD,
                self.dt,
                Shape::fixed(&[cfg.vocab_size, cfg.hidden_size]),
            )?
        };
        let logits = self.b.linear(h, head)?;
        let next = self.b.op(Op::Argmax { axis: -1 }, &[logits])?;
        self.b.output(step::LOGITS, OutputKind::Data, logits);
        self.b.output(step::NEXT_TOKEN, OutputKind::Data, next);
        Ok(self.b.finish())
    }

    /// `LlamaRotaryEmbedding.forward`: cos and sin `[B,1,head_dim]` for the positions.
    fn rope_tables(&mut self, pos: NodeId) -> Result<(NodeId, NodeId), BuildError> {
        let hd = self.cfg.head_dim;
        let half = self.d(hd / 2);
        let bd = self.batch.clone();
        let one = Dim::Fixed(1);
        let inv = self.b.op(
            Op::RopeInvFreq {
                theta: F64(self.cfg.rope_theta),
                head_dim: hd,
            },
            &[],
        )?;
        // inv_freq[None, :, None].expand(B, -1, 1)
        let inv = self.b.op(Op::Unsqueeze { axis: 0 }, &[inv])?;
        let inv = self.b.op(Op::Unsqueeze { axis: 2 }, &[inv])?;
        let inv = self.b.op(
            Op::Expand {
                shape: shape(&[bd.clone(), half.clone(), one.clone()]),
            },
            &[inv],
        )?;
        // position_ids[:, None, :].float()
        let p = self.b.op(Op::Unsqueeze { axis: 1 }, &[pos])?;
        let p = self.b.to_dtype(p, DType::F32)?;
        // (inv_freq @ positions).transpose(1, 2)
        let freqs = self.b.op(Op::MatMul, &[inv, p])?;
        let freqs = self.b.transpose(freqs, 1, 2)?;
        let emb = self.b.op(Op::Cat { axis: -1 }, &[freqs, freqs])?;
        // cos() * attention_scaling (1.0 for the default RoPE), then .to(dtype)
        let cos = self.b.unary(UnaryOp::Cos, emb)?;
        let cos = self.b.binary_scalar(BinaryOp::Mul, cos, 1.0)?;
        let cos = self.b.to_dtype(cos, self.dt)?;
        let sin = self.b.unary(UnaryOp::Sin, emb)?;
        let sin = self.b.binary_scalar(BinaryOp::Mul, sin, 1.0)?;
        let sin = self.b.to_dtype(sin, self.dt)?;
        Ok((cos, sin))
    }

    /// `LlamaRMSNorm.forward`.
    fn rms_norm(&mut self, x: NodeId, weight: NodeId) -> Result<NodeId, BuildError> {
        let h = self.b.to_dtype(x, DType::F32)?;
        let sq = self.b.binary_scalar(BinaryOp::Pow, h, 2.0)?;
        let var = self.b.reduce(ReduceOp::Mean, sq, -1, true)?;
        let var = self
            .b
            .binary_scalar(BinaryOp::Add, var, self.cfg.rms_norm_eps)?;
        let r = self.b.unary(UnaryOp::Rsqrt, var)?;
        let h = self.b.binary(BinaryOp::Mul, h, r)?;
        let h = self.b.to_dtype(h, self.dt)?;
        self.b.binary(BinaryOp::Mul, weight, h)
    }

    /// `apply_rotary_pos_emb` for one of q or k, `[B,heads,1,hd]`.
    fn rope(&mut self, x: NodeId, cos: NodeId, sin: NodeId) -> Result<NodeId, BuildError> {
        let hd = self.cfg.head_dim;
        let xc = self.b.binary(BinaryOp::Mul, x, cos)?;
        let x1 = self.b.op(
            Op::Slice {
                axis: -1,
                start: 0,
                end: hd / 2,
            },
            &[x],
        )?;
        let x2 = self.b.op(
            Op::Slice {
                axis: -1,
                start: hd / 2,
                end: hd,
            },
            &[x],
        )?;
        let nx2 = self.b.unary(UnaryOp::Neg, x2)?;
        let rot = self.b.op(Op::Cat { axis: -1 }, &[nx2, x1])?;
        let rs = self.b.binary(BinaryOp::Mul, rot, sin)?;
        self.b.binary(BinaryOp::Add, xc, rs)
    }

    /// `repeat_kv`: `[B,KV,S+1,hd]` to `[B,H,S+1,hd]`; nothing when `H == KV`.
    fn repeat_kv(&mut self, x: NodeId) -> Result<NodeId, BuildError> {
        let n_rep = self.cfg.group_size();
        if n_rep == 1 {
            return Ok(x);
        }
        let (bd, kv, len, hd) = (
            self.batch.clone(),
            self.d(self.cfg.num_kv_heads),
            self.past.plus(1),
            self.d(self.cfg.head_dim),
        );
        let e = self.b.op(Op::Unsqueeze { axis: 2 }, &[x])?;
        let e = self.b.op(
            Op::Expand {
                shape: shape(&[bd.clone(), kv, self.d(n_rep), len.clone(), hd.clone()]),
            },
            &[e],
        )?;
        // reshape of an expanded tensor cannot be a view: PyTorch copies.
        let e = self.b.op(Op::Copy, &[e])?;
        let h = self.d(self.cfg.num_heads);
        self.b.reshape(e, shape(&[bd, h, len, hd]))
    }

    fn layer(
        &mut self,
        layer: u64,
        x: NodeId,
        cos: NodeId,
        sin: NodeId,
        mask: NodeId,
    ) -> Result<NodeId, BuildError> {
        let cfg = self.cfg;
        let (d, h, kv, hd, inter) = (
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.intermediate_size,
        );
        let bd = self.batch.clone();
        let one = Dim::Fixed(1);
        let w = |b: &mut Builder, module: &str, dims: &[u64]| {
            b.weight(
                &step::layer_weight(layer, module),
                cfg.dtype,
                Shape::fixed(dims),
            )
        };

        // Attention block.
        let w_norm = w(&mut self.b, "input_layernorm", &[d])?;
        let n = self.rms_norm(x, w_norm)?;
        let mut heads = Vec::new();
        for (module, count) in [
            ("self_attn.q_proj", h),
            ("self_attn.k_proj", kv),
            ("self_attn.v_proj", kv),
        ] {
            let wp = w(&mut self.b, module, &[count * hd, d])?;
            let p = self.b.linear(n, wp)?;
            let p = self.b.reshape(
                p,
                shape(&[bd.clone(), one.clone(), self.d(count), self.d(hd)]),
            )?;
            heads.push(self.b.transpose(p, 1, 2)?);
        }
        let (q, k, v) = (heads[0], heads[1], heads[2]);
        let cos4 = self.b.op(Op::Unsqueeze { axis: 1 }, &[cos])?;
        let sin4 = self.b.op(Op::Unsqueeze { axis: 1 }, &[sin])?;
        let q = self.rope(q, cos4, sin4)?;
        let k = self.rope(k, cos4, sin4)?;

        // DynamicCache.update: torch.cat along the sequence axis.
        let cache_ty = TensorType::new(
            self.dt,
            shape(&[bd.clone(), self.d(kv), self.past.clone(), self.d(hd)]),
        );
        let mut caches = Vec::new();
        for (name, new) in [(step::past_key(layer), k), (step::past_value(layer), v)] {
            let past = self.b.input(&name, InputKind::State, cache_ty.clone())?;
            let all = self.b.op(Op::Cat { axis: -2 }, &[past, new])?;
            self.b.output(&name, OutputKind::State, all);
            caches.push(all);
        }
        let k_all = self.repeat_kv(caches[0])?;
        let v_all = self.repeat_kv(caches[1])?;

        let kt = self.b.transpose(k_all, 2, 3)?;
        let scores = self.b.op(Op::MatMul, &[q, kt])?;
        let scores = self
            .b
            .binary_scalar(BinaryOp::Mul, scores, (hd as f64).powf(-0.5))?;
        let scores = self.b.binary(BinaryOp::Add, scores, mask)?;
        let scores = self.b.to_dtype(scores, DType::F32)?;
        let probs = self.b.op(Op::Softmax { axis: -1 }, &[scores])?;
        let probs = self.b.to_dtype(probs, self.dt)?;
        let o = self.b.op(Op::MatMul, &[probs, v_all])?;
        let o = self.b.transpose(o, 1, 2)?;
        let o = self
            .b
            .reshape(o, shape(&[bd.clone(), one.clone(), self.d(h * hd)]))?;
        let wo = w(&mut self.b, "self_attn.o_proj", &[d, h * hd])?;
        let o = self.b.linear(o, wo)?;
        let x = self.b.binary(BinaryOp::Add, x, o)?;

        // MLP block.
        let w_norm = w(&mut self.b, "post_attention_layernorm", &[d])?;
        let n = self.rms_norm(x, w_norm)?;
        let wg = w(&mut self.b, "mlp.gate_proj", &[inter, d])?;
        let wu = w(&mut self.b, "mlp.up_proj", &[inter, d])?;
        let g = self.b.linear(n, wg)?;
        let u = self.b.linear(n, wu)?;
        let g = self.b.unary(UnaryOp::Silu, g)?;
        let a = self.b.binary(BinaryOp::Mul, g, u)?;
        let wd = w(&mut self.b, "mlp.down_proj", &[d, inter])?;
        let m = self.b.linear(a, wd)?;
        self.b.binary(BinaryOp::Add, x, m)
    }
}
