//! The kernels Gemma 2 and Gemma 3 fuse into, against the primitive ops they replace
//! (as the eager graph composes them, roundings included), in f32 and bf16:
//!
//! - `fused.offset_rms_norm(x, w, eps, c[, r])`: transformers' `Gemma2RMSNorm`
//!   (models/gemma2/modeling_gemma2.py: `(x32 * rsqrt(...) * (1.0 +
//!   weight.float())).type_as(x)`) and the residual add after Gemma's post-norms, bit
//!   for bit;
//! - `fused.linear_offset_rms_norm(x, W, w, eps, c, r)`: Gemma's `o_proj` and
//!   `down_proj` with their post-norm and residual add, bit for bit;
//! - `fused.offset_rms_norm_linear(x, w, eps, c, W1, .., Wn)` and
//!   `fused.offset_rms_norm_geglu(x, w, eps, c, Wg, Wu)`: the norm in the GEMVs'
//!   prologue (`input_layernorm` before q, k and v; `pre_feedforward_layernorm`
//!   before the MLP), bit for bit;
//! - `fused.geglu(x, Wg, Wu)`: `down_proj`'s input in `Gemma2MLP.forward`,
//!   `gelu_pytorch_tanh(gate_proj(x)) * up_proj(x)`, bit for bit;
//! - `fused.attention(q, k, v, scale, mask, c)`: `eager_attention_forward` with
//!   `softcap`, `tanh(scores / c) * c` before the mask: bit for bit in f32 (with
//!   `head_dim > 1`, as the plain attention), to the probabilities' bf16 rounding in
//!   bf16; and `fused.decode_attention_capped`, RoPE, the appends and that attention
//!   in one kernel, bit for bit.

use fusec_exec::kernels::attention::{attention_capped, decode_attention_capped, Caches};
use fusec_exec::kernels::elementwise::{binary, cast, unary, Arg};
use fusec_exec::kernels::fused::{
    geglu, linear_offset_rms_norm, offset_rms_norm, offset_rms_norm_geglu, offset_rms_norm_linear,
    rope,
};
use fusec_exec::kernels::gemv::GemvWeight;
use fusec_exec::kernels::matmul::{linear, matmul};
use fusec_exec::kernels::movement::{cat, copy};
use fusec_exec::kernels::reduce::{reduce, softmax};
use fusec_exec::{SplitMix64, Tensor};
use fusec_ir::{BinaryOp, DType, ReduceOp, UnaryOp};
use proptest::prelude::*;

fn random(dtype: DType, shape: &[usize], rng: &mut SplitMix64, std: f64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_f32(
        dtype,
        shape,
        (0..n).map(|_| (rng.normal() * std) as f32).collect(),
    )
    .expect("sizes match")
}

fn bin(op: BinaryOp, a: &Tensor, b: &Tensor) -> Tensor {
    binary(op, Arg::Tensor(a), Arg::Tensor(b)).expect("operands broadcast")
}

fn bin_s(op: BinaryOp, a: &Tensor, s: f32) -> Tensor {
    binary(op, Arg::Tensor(a), Arg::Scalar(s)).expect("scalar operand")
}

fn dtype_of(half: bool) -> DType {
    if half {
        DType::Bf16
    } else {
        DType::F32
    }
}

/// `Gemma2RMSNorm` as the eager graph spells it.
fn eager_gemma_norm(x: &Tensor, w: &Tensor, eps: f32) -> Tensor {
    let x32 = cast(x, DType::F32).expect("casts");
    let sq = bin_s(BinaryOp::Pow, &x32, 2.0);
    let mean = reduce(ReduceOp::Mean, &sq, x.rank() - 1, true).expect("reduces");
    let r = unary(UnaryOp::Rsqrt, &bin_s(BinaryOp::Add, &mean, eps)).expect("rsqrt");
    let n = bin(BinaryOp::Mul, &x32, &r);
    let w1 = bin_s(BinaryOp::Add, &cast(w, DType::F32).expect("casts"), 1.0);
    cast(&bin(BinaryOp::Mul, &n, &w1), x.dtype()).expect("casts")
}

/// `repeat_kv`: `[B, KV, L, hd]` to `[B, KV * group, L, hd]` by expand and copy.
fn repeat_kv(k: &Tensor, group: usize) -> Tensor {
    let [b, kv, l, hd] = [k.shape()[0], k.shape()[1], k.shape()[2], k.shape()[3]];
    let e = k
        .unsqueeze(2)
        .and_then(|t| t.expand(&[b, kv, group, l, hd]))
        .expect("views");
    copy(&e)
        .expect("copies")
        .reshape(&[b, kv * group, l, hd])
        .expect("viewable")
}

/// `eager_attention_forward` with `scaling` and `softcap`.
fn eager_capped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    cap: f32,
    mask: &Tensor,
) -> Tensor {
    let group = q.shape()[1] / k.shape()[1];
    let (k, v) = (repeat_kv(k, group), repeat_kv(v, group));
    let scores = matmul(q, &k.transpose(2, 3).expect("axes")).expect("matmul");
    let scores = bin_s(BinaryOp::Mul, &scores, scale);
    let scores = bin_s(BinaryOp::Div, &scores, cap);
    let scores = unary(UnaryOp::Tanh, &scores).expect("tanh");
    let scores = bin_s(BinaryOp::Mul, &scores, cap);
    let scores = bin(BinaryOp::Add, &scores, mask);
    let p = softmax(&cast(&scores, DType::F32).expect("casts"), 3).expect("softmax");
    matmul(&cast(&p, q.dtype()).expect("casts"), &v).expect("matmul")
}

fn assert_same(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.dtype(), b.dtype(), "{what}: dtype");
    assert_eq!(a.shape(), b.shape(), "{what}: shape");
    assert_eq!(a.to_vec_f32(), b.to_vec_f32(), "{what}: values");
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += f64::from(x - y).powi(2);
        den += f64::from(*y).powi(2);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn offset_rms_norm_equals_gemmas_norm_and_residual_add(
        seed in 0u64..1000,
        rows in 1usize..4,
        heads in 1usize..3,
        d in 1usize..40,
        half in any::<bool>(),
    ) {
        let dtype = dtype_of(half);
        let mut rng = SplitMix64::new(seed);
        // [rows, heads, 1, d]: Gemma 3's per-head q/k norms as well as the [B,1,D] ones.
        let x = random(dtype, &[rows, heads, 1, d], &mut rng, 1.0);
        let w = random(dtype, &[d], &mut rng, 0.5);
        let r = random(dtype, &[rows, heads, 1, d], &mut rng, 1.0);
        let eps = 1e-6;
        let n = eager_gemma_norm(&x, &w, eps);
        assert_same(&offset_rms_norm(&x, &w, eps, 1.0, None).expect("runs"), &n, "offset_rms_norm");
        assert_same(
            &offset_rms_norm(&x, &w, eps, 1.0, Some(&r)).expect("runs"),
            &bin(BinaryOp::Add, &r, &n),
            "offset_rms_norm with a residual",
        );
    }

    #[test]
    fn linear_offset_rms_norm_equals_gemmas_projection_norm_and_add(
        seed in 0u64..1000,
        rows in 1usize..4,
        d in 1usize..40,
        outs in 1usize..24,
        half in any::<bool>(),
    ) {
        let dtype = dtype_of(half);
        let mut rng = SplitMix64::new(seed);
        let x = random(dtype, &[rows, 1, d], &mut rng, 1.0);
        let wt = random(dtype, &[outs, d], &mut rng, 0.1);
        let w = random(dtype, &[outs], &mut rng, 0.5);
        let r = random(dtype, &[rows, 1, outs], &mut rng, 1.0);
        let eps = 1e-6;
        let y = linear(&x, &wt).expect("linear");
        let eager = bin(BinaryOp::Add, &r, &eager_gemma_norm(&y, &w, eps));
        let fused = linear_offset_rms_norm(&x, GemvWeight::Dense(&wt), &w, eps, 1.0, &r)
            .expect("runs");
        assert_same(&fused, &eager, "linear_offset_rms_norm");
    }

    #[test]
    fn offset_norm_prologues_equal_the_norm_then_the_gemvs(
        seed in 0u64..1000,
        rows in 1usize..4,
        d in 1usize..40,
        outs in 1usize..24,
        half in any::<bool>(),
    ) {
        let dtype = dtype_of(half);
        let mut rng = SplitMix64::new(seed);
        let x = random(dtype, &[rows, 1, d], &mut rng, 1.0);
        let w = random(dtype, &[d], &mut rng, 0.5);
        let ws: Vec<Tensor> = (0..3).map(|i| random(dtype, &[outs + i, d], &mut rng, 0.2)).collect();
        let eps = 1e-6;
        let n = eager_gemma_norm(&x, &w, eps);
        let gw: Vec<GemvWeight<'_>> = ws.iter().map(GemvWeight::Dense).collect();
        let fused = offset_rms_norm_linear(&x, &w, eps, 1.0, &gw).expect("runs");
        prop_assert_eq!(fused.len(), 3);
        for (f, wt) in fused.iter().zip(&ws) {
            assert_same(f, &linear(&n, wt).expect("linear"), "offset_rms_norm_linear");
        }
        let (wg, wu) = (&ws[0], &random(dtype, &[outs, d], &mut rng, 0.2));
        let g = unary(UnaryOp::GeluTanh, &linear(&n, wg).expect("linear")).expect("gelu");
        let eager = bin(BinaryOp::Mul, &g, &linear(&n, wu).expect("linear"));
        let fused = offset_rms_norm_geglu(&x, &w, eps, 1.0, GemvWeight::Dense(wg), GemvWeight::Dense(wu))
            .expect("runs");
        assert_same(&fused, &eager, "offset_rms_norm_geglu");
    }

    #[test]
    fn geglu_equals_gemmas_gated_mlp(
        seed in 0u64..1000,
        rows in 1usize..4,
        d in 1usize..40,
        outs in 1usize..24,
        half in any::<bool>(),
    ) {
        let dtype = dtype_of(half);
        let mut rng = SplitMix64::new(seed);
        let x = random(dtype, &[rows, 1, d], &mut rng, 1.0);
        let wg = random(dtype, &[outs, d], &mut rng, 0.3);
        let wu = random(dtype, &[outs, d], &mut rng, 0.3);
        let g = unary(UnaryOp::GeluTanh, &linear(&x, &wg).expect("linear")).expect("gelu");
        let eager = bin(BinaryOp::Mul, &g, &linear(&x, &wu).expect("linear"));
        let fused = geglu(&x, GemvWeight::Dense(&wg), GemvWeight::Dense(&wu)).expect("runs");
        assert_same(&fused, &eager, "geglu");
    }

    #[test]
    fn soft_capped_attention_equals_its_eager_composition(
        seed in 0u64..1000,
        kv_heads in 1usize..4,
        group in 1usize..4,
        hd in 2usize..20,
        len in 1usize..12,
        half in any::<bool>(),
        cap in 0.5f32..60.0,
    ) {
        let dtype = dtype_of(half);
        let heads = kv_heads * group;
        let mut rng = SplitMix64::new(seed);
        // Large enough scores that the cap bends them.
        let q = random(dtype, &[2, heads, 1, hd], &mut rng, 4.0);
        let k = random(dtype, &[2, kv_heads, len, hd], &mut rng, 4.0);
        let v = random(dtype, &[2, kv_heads, len, hd], &mut rng, 1.0);
        let mut m = vec![0.0f32; 2 * len];
        if len > 1 {
            m[len] = f32::NEG_INFINITY;
        }
        let mask = Tensor::from_f32(dtype, &[2, 1, 1, len], m).expect("sizes match");
        let scale = 1.0 / (hd as f32).sqrt();
        let got = attention_capped(&q, &k, &v, scale, Some(cap), &mask, None).expect("runs");
        let want = eager_capped_attention(&q, &k, &v, scale, cap, &mask);
        if !half {
            assert_same(&got, &want, "soft-capped attention");
        }
        // bf16: the eager graph rounds the probabilities to bf16, the kernel does not.
        let err = rel_l2(&got.to_vec_f32(), &want.to_vec_f32());
        prop_assert!(err <= 1e-2, "relative L2 error {}", err);
    }
}

/// The cap changes the result (so the tests above exercise it): a small cap flattens
/// the scores, which without it would differ.
#[test]
fn the_cap_changes_attention() {
    let mut rng = SplitMix64::new(3);
    let q = random(DType::F32, &[1, 2, 1, 8], &mut rng, 4.0);
    let k = random(DType::F32, &[1, 1, 6, 8], &mut rng, 4.0);
    let v = random(DType::F32, &[1, 1, 6, 8], &mut rng, 1.0);
    let mask = Tensor::from_f32(DType::F32, &[1, 1, 1, 6], vec![0.0; 6]).expect("sizes");
    let capped = attention_capped(&q, &k, &v, 0.35, Some(0.5), &mask, None).expect("runs");
    let plain = attention_capped(&q, &k, &v, 0.35, None, &mask, None).expect("runs");
    assert!(rel_l2(&capped.to_vec_f32(), &plain.to_vec_f32()) > 1e-2);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// `fused.decode_attention_capped` is RoPE, the appends and the soft-capped
    /// attention, bit for bit in f32.
    #[test]
    fn capped_decode_attention_equals_rope_append_and_capped_attention(
        seed in 0u64..1000,
        kv_heads in 1usize..3,
        group in 1usize..4,
        half_dim in 1usize..6,
        past in 0usize..8,
        cap in 0.5f32..60.0,
    ) {
        let dtype = DType::F32;
        let (heads, hd) = (kv_heads * group, 2 * half_dim);
        let mut rng = SplitMix64::new(seed);
        let q = random(dtype, &[1, heads, 1, hd], &mut rng, 4.0);
        let k = random(dtype, &[1, kv_heads, 1, hd], &mut rng, 4.0);
        let v = random(dtype, &[1, kv_heads, 1, hd], &mut rng, 1.0);
        let cos = random(dtype, &[1, 1, 1, hd], &mut rng, 1.0);
        let sin = random(dtype, &[1, 1, 1, hd], &mut rng, 1.0);
        let pk = random(dtype, &[1, kv_heads, past, hd], &mut rng, 4.0);
        let pv = random(dtype, &[1, kv_heads, past, hd], &mut rng, 1.0);
        let mask = Tensor::from_f32(dtype, &[1, 1, 1, past + 1], vec![0.0; past + 1])
            .expect("sizes");
        let scale = 1.0 / (hd as f32).sqrt();
        let (mut ck, mut cv) = (pk.clone(), pv.clone());
        let ([out, k_all, v_all], _) = decode_attention_capped(
            &q,
            &k,
            &v,
            &cos,
            &sin,
            Caches { past_k: &mut ck, past_v: &mut cv, scales: None, ring: None },
            (scale, Some(cap)),
            &mask,
        )
        .expect("runs");
        let q_rot = rope(&q, &cos, &sin).expect("rope");
        let k_rot = rope(&k, &cos, &sin).expect("rope");
        let want_k = cat(&[&pk, &k_rot], 2).expect("cat");
        let want_v = cat(&[&pv, &v], 2).expect("cat");
        assert_same(&k_all, &want_k, "k_all");
        assert_same(&v_all, &want_v, "v_all");
        let want = attention_capped(&q_rot, &want_k, &want_v, scale, Some(cap), &mask, None)
            .expect("runs");
        assert_same(&out, &want, "capped decode attention");
    }
}
