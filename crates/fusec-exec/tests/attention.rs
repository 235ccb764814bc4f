//! The in-place append: from strided inputs, and into E4M3 caches.

use fusec_exec::kernels::attention::{append, decode_attention, kv_append, Caches};
use fusec_exec::kernels::movement::cat;
use fusec_exec::{SplitMix64, Tensor};
use fusec_ir::numerics::round_to;
use fusec_ir::DType;

const E4M3: DType = DType::Fp8E4M3;

fn random(dtype: DType, shape: &[usize], rng: &mut SplitMix64) -> Tensor {
    let n = shape.iter().product();
    let values = (0..n).map(|_| rng.normal() as f32).collect();
    Tensor::from_f32(dtype, shape, values).expect("sizes match")
}

/// Quantizes `t` as an FP8 cache with scale `s` stores it: `fp8(x / s)`.
fn codes(t: &Tensor, s: f32) -> Tensor {
    let vals = t
        .to_vec_f32()
        .iter()
        .map(|&x| round_to(E4M3, x / s))
        .collect();
    Tensor::from_f32(E4M3, t.shape(), vals).expect("sizes match")
}

#[test]
fn append_reads_strided_inputs_in_place() {
    let mut rng = SplitMix64::new(5);
    let cache = random(DType::F32, &[2, 3, 4, 6], &mut rng);
    // Two new positions laid out [b, l, h, d], seen as [b, h, l, d]: not contiguous.
    let new = random(DType::F32, &[2, 2, 3, 6], &mut rng)
        .transpose(1, 2)
        .expect("axes");
    assert!(!new.is_contiguous());
    let expected = cat(&[&cache, &new], 2).expect("cats");
    let mut owned = cache.with_capacity(2, 8).expect("axis");
    let (all, copied) = kv_append(&mut owned, &new).expect("appends");
    assert_eq!(copied, 0);
    assert_eq!(all.to_vec_f32(), expected.to_vec_f32());
    // Along the last axis too, where a row of the input is the appended span.
    let row = random(DType::F32, &[3, 4], &mut rng);
    let more = random(DType::F32, &[2, 3], &mut rng)
        .transpose(0, 1)
        .expect("axes");
    let mut owned = row.with_capacity(1, 6).expect("axis");
    let (all, _) = append(&mut owned, &more, 1, |x| x).expect("appends");
    assert_eq!(
        all.to_vec_f32(),
        cat(&[&row, &more], 1).expect("cats").to_vec_f32()
    );
}

#[test]
fn an_e4m3_cache_stores_what_the_generic_rounding_gives() {
    let mut rng = SplitMix64::new(9);
    let (ks, vs) = (0.015f32, 0.7f32);
    // Values over a wide range, so that some quantize to subnormals and some saturate.
    let spread = |shape: &[usize], rng: &mut SplitMix64| {
        let n: usize = shape.iter().product();
        let vals = (0..n)
            .map(|_| (rng.normal() * 10f64.powf(rng.uniform(-4.0, 3.0))) as f32)
            .collect();
        Tensor::from_f32(DType::F32, shape, vals).expect("sizes match")
    };
    let (q, k, v) = (
        spread(&[1, 2, 1, 8], &mut rng),
        spread(&[1, 2, 1, 8], &mut rng),
        spread(&[1, 2, 1, 8], &mut rng),
    );
    let ones = Tensor::from_f32(DType::F32, &[1, 1, 1, 8], vec![1.0; 8]).expect("sizes");
    let zeros = Tensor::zeros(DType::F32, &[1, 1, 1, 8]).expect("valid");
    let mut ck = Tensor::zeros_with_capacity(E4M3, &[1, 2, 0, 8], 2, 4).expect("valid");
    let mut cv = Tensor::zeros_with_capacity(E4M3, &[1, 2, 0, 8], 2, 4).expect("valid");
    let mask = Tensor::zeros(DType::F32, &[1, 1, 1, 1]).expect("valid");
    let caches = Caches {
        past_k: &mut ck,
        past_v: &mut cv,
        scales: Some((ks, vs)),
    };
    // cos 1 and sin 0 make RoPE the identity, so the cache holds fp8(k / ks).
    let ([_, k_all, v_all], _) =
        decode_attention(&q, &k, &v, &ones, &zeros, caches, 1.0, &mask).expect("runs");
    let bits = |t: &Tensor| {
        t.to_vec_f32()
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&k_all), bits(&codes(&k, ks)));
    assert_eq!(bits(&v_all), bits(&codes(&v, vs)));
}
