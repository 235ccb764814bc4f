//! The kernels OLMo 2 and Granite 3 fuse into, against the primitive ops they replace
//! (as the eager graph composes them, roundings included), bit for bit, in f32 and
//! bf16:
//!
//! - `fused.post_rms_norm(x, w, eps[, r])`: transformers' `Olmo2RMSNorm`
//!   (models/olmo2/modeling_olmo2.py: `(weight * x32 * rsqrt(...)).to(input_dtype)`)
//!   and the residual add of `Olmo2DecoderLayer.forward`;
//! - `fused.linear_scale_add(x, W, c, r)`: `residual + hidden_states *
//!   residual_multiplier` of `GraniteDecoderLayer.forward`
//!   (models/granite/modeling_granite.py);
//! - `fused.linear_post_rms_norm(x, W, w, eps, r)`: OLMo 2's `o_proj` and `down_proj`
//!   with their post-norm and residual add;
//! - `fused.multi_linear(x, W1, .., Wn)`: OLMo 2's q, k and v projections of the
//!   residual stream in one kernel, each what `linear` gives.

use fusec_exec::kernels::elementwise::{binary, cast, unary, Arg};
use fusec_exec::kernels::fused::{
    linear_post_rms_norm, linear_scale_add, multi_linear, post_rms_norm,
};
use fusec_exec::kernels::gemv::GemvWeight;
use fusec_exec::kernels::matmul::linear;
use fusec_exec::kernels::reduce::reduce;
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

/// `Olmo2RMSNorm` as the eager graph spells it: the weight promoted to f32, one cast
/// of the product back to the input's dtype.
fn eager_olmo2_norm(x: &Tensor, w: &Tensor, eps: f32) -> Tensor {
    let x32 = cast(x, DType::F32).expect("casts");
    let sq = bin_s(BinaryOp::Pow, &x32, 2.0);
    let mean = reduce(ReduceOp::Mean, &sq, x.rank() - 1, true).expect("reduces");
    let r = unary(UnaryOp::Rsqrt, &bin_s(BinaryOp::Add, &mean, eps)).expect("rsqrt");
    let n = bin(BinaryOp::Mul, &x32, &r);
    let w32 = cast(w, DType::F32).expect("casts");
    cast(&bin(BinaryOp::Mul, &w32, &n), x.dtype()).expect("casts")
}

fn assert_same(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.dtype(), b.dtype(), "{what}: dtype");
    assert_eq!(a.shape(), b.shape(), "{what}: shape");
    assert_eq!(a.to_vec_f32(), b.to_vec_f32(), "{what}: values");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn post_rms_norm_equals_olmo2s_norm_and_residual_add(
        seed in 0u64..1000,
        rows in 1usize..4,
        d in 1usize..40,
        half in any::<bool>(),
    ) {
        let dtype = if half { DType::Bf16 } else { DType::F32 };
        let mut rng = SplitMix64::new(seed);
        let x = random(dtype, &[rows, 1, d], &mut rng, 1.0);
        let w = random(dtype, &[d], &mut rng, 1.0);
        let r = random(dtype, &[rows, 1, d], &mut rng, 1.0);
        let eps = 1e-6;
        let n = eager_olmo2_norm(&x, &w, eps);
        assert_same(&post_rms_norm(&x, &w, eps, None).expect("runs"), &n, "post_rms_norm");
        assert_same(
            &post_rms_norm(&x, &w, eps, Some(&r)).expect("runs"),
            &bin(BinaryOp::Add, &r, &n),
            "post_rms_norm with a residual",
        );
    }

    #[test]
    fn linear_post_rms_norm_equals_olmo2s_projection_norm_and_add(
        seed in 0u64..1000,
        rows in 1usize..4,
        d in 1usize..40,
        outs in 1usize..24,
        half in any::<bool>(),
    ) {
        let dtype = if half { DType::Bf16 } else { DType::F32 };
        let mut rng = SplitMix64::new(seed);
        let x = random(dtype, &[rows, 1, d], &mut rng, 1.0);
        let wt = random(dtype, &[outs, d], &mut rng, 0.1);
        let w = random(dtype, &[outs], &mut rng, 1.0);
        let r = random(dtype, &[rows, 1, outs], &mut rng, 1.0);
        let eps = 1e-6;
        let y = linear(&x, &wt).expect("linear");
        let eager = bin(BinaryOp::Add, &r, &eager_olmo2_norm(&y, &w, eps));
        let fused = linear_post_rms_norm(&x, GemvWeight::Dense(&wt), &w, eps, &r).expect("runs");
        assert_same(&fused, &eager, "linear_post_rms_norm");
    }

    #[test]
    fn linear_scale_add_equals_granites_scaled_residual(
        seed in 0u64..1000,
        rows in 1usize..4,
        d in 1usize..40,
        outs in 1usize..24,
        half in any::<bool>(),
        c in -2.0f32..2.0,
    ) {
        let dtype = if half { DType::Bf16 } else { DType::F32 };
        let mut rng = SplitMix64::new(seed);
        let x = random(dtype, &[rows, 1, d], &mut rng, 1.0);
        let wt = random(dtype, &[outs, d], &mut rng, 0.1);
        let r = random(dtype, &[rows, 1, outs], &mut rng, 1.0);
        let eager = bin(
            BinaryOp::Add,
            &r,
            &bin_s(BinaryOp::Mul, &linear(&x, &wt).expect("linear"), c),
        );
        let fused = linear_scale_add(&x, GemvWeight::Dense(&wt), c, &r).expect("runs");
        assert_same(&fused, &eager, "linear_scale_add");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn multi_linear_equals_its_linears(
        seed in 0u64..1000,
        rows in 1usize..4,
        d in 1usize..40,
        outs in 1usize..24,
        half in any::<bool>(),
    ) {
        let dtype = if half { DType::Bf16 } else { DType::F32 };
        let mut rng = SplitMix64::new(seed);
        let x = random(dtype, &[rows, 1, d], &mut rng, 1.0);
        let ws: Vec<Tensor> = (0..3).map(|i| random(dtype, &[outs + i, d], &mut rng, 0.1)).collect();
        let gw: Vec<GemvWeight<'_>> = ws.iter().map(GemvWeight::Dense).collect();
        let fused = multi_linear(&x, &gw).expect("runs");
        prop_assert_eq!(fused.len(), 3);
        for (f, wt) in fused.iter().zip(&ws) {
            assert_same(f, &linear(&x, wt).expect("linear"), "multi_linear");
        }
    }
}

#[test]
fn mismatched_operands_are_errors() {
    let mut rng = SplitMix64::new(7);
    let x = random(DType::F32, &[1, 1, 8], &mut rng, 1.0);
    let w = random(DType::F32, &[8], &mut rng, 1.0);
    let short = random(DType::F32, &[1, 1, 4], &mut rng, 1.0);
    assert!(post_rms_norm(&x, &w, 1e-6, Some(&short)).is_err());
    assert!(post_rms_norm(&x, &short, 1e-6, None).is_err());
    let wt = random(DType::F32, &[6, 8], &mut rng, 0.1);
    assert!(linear_scale_add(&x, GemvWeight::Dense(&wt), 0.5, &x).is_err());
}
