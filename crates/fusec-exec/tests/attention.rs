//! The attention kernels against a straightforward `f64` reference: random shapes
//! with batches, GQA groups of 1, 2 and 4, MQA, groups wider than a row tile,
//! `head_dim` not a multiple of 8, strided operands, masks with `-inf` entries, fully
//! masked rows, several query positions, and FP8 caches with scales; results that do
//! not depend on the thread count; the in-place append from strided inputs and into
//! E4M3 caches; and E4M3 caches in compact storage (one byte per value), which must
//! give what the same values stored as `f32` give, bit for bit.

use fusec_exec::kernels::attention::{
    append, attention, decode_attention, kv_append, Caches, Ring,
};
use fusec_exec::kernels::fused::rope;
use fusec_exec::kernels::movement::cat;
use fusec_exec::tensor::Buffer;
use fusec_exec::{SplitMix64, Tensor};
use fusec_ir::numerics::round_to;
use fusec_ir::DType;
use proptest::prelude::*;

const E4M3: DType = DType::Fp8E4M3;

fn random(dtype: DType, shape: &[usize], rng: &mut SplitMix64) -> Tensor {
    let n = shape.iter().product();
    let values = (0..n).map(|_| rng.normal() as f32).collect();
    Tensor::from_f32(dtype, shape, values).expect("sizes match")
}

/// `[b, h, l, d]` values as a strided view whose `head_dim` axis is not contiguous
/// (the transpose of a contiguous `[b, h, d, l]` tensor), to reach the kernel's
/// strided fallback.
fn strided(t: &Tensor) -> Tensor {
    let swapped = t.transpose(2, 3).expect("axes");
    let v = Tensor::from_f32(t.dtype(), swapped.shape(), swapped.to_vec_f32())
        .expect("sizes match")
        .transpose(2, 3)
        .expect("axes");
    assert_eq!(v.to_vec_f32(), t.to_vec_f32());
    v
}

/// `softmax(q k^T * scale + mask) v` in `f64`, on the values the operands hold (an FP8
/// cache's codes times its scale), with query head `h` reading KV head `h / group`.
fn reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    mask: &Tensor,
    kv_scales: (f64, f64),
) -> Vec<f64> {
    let (qs, ks) = (q.shape(), k.shape());
    let [b, heads, tq, hd] = [qs[0], qs[1], qs[2], qs[3]];
    let [kv_heads, len] = [ks[1], ks[2]];
    let group = heads / kv_heads;
    let mask = mask.expand(&[b, heads, tq, len]).expect("broadcasts");
    let at = |t: &Tensor, i: [usize; 4]| t.get(&i).expect("in range");
    let mut out = Vec::with_capacity(b * heads * tq * hd);
    for bi in 0..b {
        for h in 0..heads {
            for t in 0..tq {
                let kh = h / group;
                let s: Vec<f64> = (0..len)
                    .map(|j| {
                        let qk: f64 = (0..hd)
                            .map(|d| at(q, [bi, h, t, d]) * at(k, [bi, kh, j, d]) * kv_scales.0)
                            .sum();
                        qk * f64::from(scale) + at(&mask, [bi, h, t, j])
                    })
                    .collect();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|&x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..hd {
                    let acc: f64 = (0..len)
                        .map(|j| e[j] / sum * at(v, [bi, kh, j, d]) * kv_scales.1)
                        .sum();
                    out.push(if max == f64::NEG_INFINITY {
                        f64::NAN
                    } else {
                        acc
                    });
                }
            }
        }
    }
    out
}

/// Checks `got` against the `f64` reference, element by element: NaN exactly where
/// the reference is NaN (fully masked rows), else within `tol` times the largest
/// value magnitude (an output is a convex combination of value rows, so that bounds
/// its scale).
fn assert_close(got: &Tensor, want: &[f64], v: &Tensor, v_scale: f64, tol: f64) {
    let vmax = v
        .to_vec_f32()
        .iter()
        .fold(0.0f64, |m, &x| m.max(f64::from(x).abs() * v_scale));
    for (i, (&g, &w)) in got.to_vec_f32().iter().zip(want).enumerate() {
        if w.is_nan() {
            assert!(g.is_nan(), "element {i}: {g}, want NaN");
        } else {
            let err = (f64::from(g) - w).abs();
            assert!(err <= tol * vmax.max(1e-30), "element {i}: {g}, want {w}");
        }
    }
}

/// A `[b, 1, tq, len]` mask with about a fifth of the entries `-inf` and the others
/// small finite values, and (when `masked_row`) the last row of the first sequence
/// entirely `-inf`.
fn random_mask(
    dtype: DType,
    b: usize,
    tq: usize,
    len: usize,
    masked_row: bool,
    rng: &mut SplitMix64,
) -> Tensor {
    let mut m: Vec<f32> = (0..b * tq * len)
        .map(|_| {
            if rng.below(5) == 0 {
                f32::NEG_INFINITY
            } else {
                (rng.normal() * 0.5) as f32
            }
        })
        .collect();
    if masked_row {
        m[(tq - 1) * len..tq * len].fill(f32::NEG_INFINITY);
    }
    Tensor::from_f32(dtype, &[b, 1, tq, len], m).expect("sizes match")
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn attention_matches_an_f64_reference(
        seed in 0u64..10_000,
        batch in 1usize..4,
        kv_heads in 1usize..4,
        group_pick in 0usize..4,
        hd in prop_oneof![1usize..20, 60usize..70],
        tq in prop_oneof![Just(1usize), 2usize..4],
        len in 1usize..40,
        masked_row in any::<bool>(),
        strided_kv in any::<bool>(),
        half in any::<bool>(),
    ) {
        // GQA groups of 1, 2 and 4, and one wider than a row tile.
        let group = [1, 2, 4, 9][group_pick];
        let heads = kv_heads * group;
        let dtype = if half { DType::Bf16 } else { DType::F32 };
        let mut rng = SplitMix64::new(seed);
        let q = random(dtype, &[batch, heads, tq, hd], &mut rng);
        let mut k = random(dtype, &[batch, kv_heads, len, hd], &mut rng);
        let mut v = random(dtype, &[batch, kv_heads, len, hd], &mut rng);
        if strided_kv {
            k = strided(&k);
            v = strided(&v);
        }
        let mask = random_mask(dtype, batch, tq, len, masked_row, &mut rng);
        let scale = 1.0 / (hd as f32).sqrt();
        let got = attention(&q, &k, &v, scale, &mask, None).expect("runs");
        prop_assert_eq!(got.shape(), &[batch, heads, tq, hd][..]);
        let want = reference(&q, &k, &v, scale, &mask, (1.0, 1.0));
        // f32: the scores and probabilities round at 2^-24 relative, and an error of
        // e in a score moves the probabilities by about e; bf16 rounds the scores
        // (2^-9 relative, on scores of a few units) and the output.
        let tol = if half { 3e-2 } else { 2e-5 };
        assert_close(&got, &want, &v, 1.0, tol);
    }

    #[test]
    fn attention_over_fp8_caches_matches_an_f64_reference(
        seed in 0u64..10_000,
        batch in 1usize..3,
        kv_heads in 1usize..3,
        group in prop_oneof![Just(1usize), Just(2), Just(4)],
        hd in 1usize..40,
        len in 1usize..30,
        masked_row in any::<bool>(),
    ) {
        let heads = kv_heads * group;
        let mut rng = SplitMix64::new(seed);
        let q = random(DType::F32, &[batch, heads, 1, hd], &mut rng);
        let (ks, vs) = (0.0123f32, 0.0456f32);
        let k = codes(&random(DType::F32, &[batch, kv_heads, len, hd], &mut rng), ks);
        let v = codes(&random(DType::F32, &[batch, kv_heads, len, hd], &mut rng), vs);
        let mask = random_mask(DType::F32, batch, 1, len, masked_row, &mut rng);
        let scale = 1.0 / (hd as f32).sqrt();
        let got = attention(&q, &k, &v, scale, &mask, Some((ks, vs))).expect("runs");
        let want = reference(&q, &k, &v, scale, &mask, (f64::from(ks), f64::from(vs)));
        assert_close(&got, &want, &v, f64::from(vs), 2e-5);
    }
}

/// A causal mask over `past` cached positions and `tq` new ones (key `j` visible to
/// query `t` when `j <= past + t`), the others `masked`: `[b, 1, tq, past + tq]`.
fn causal_mask(dtype: DType, b: usize, tq: usize, past: usize, masked: f32) -> Tensor {
    let len = past + tq;
    let m: Vec<f32> = (0..b * tq * len)
        .map(|i| {
            let (t, j) = (i / len % tq, i % len);
            if j <= past + t {
                0.0
            } else {
                masked
            }
        })
        .collect();
    Tensor::from_f32(dtype, &[b, 1, tq, len], m).expect("sizes match")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// A prefill chunk's causal mask (transformers' `torch.finfo(dtype).min`) lets
    /// attention skip each row's future keys; the result must be the one with no
    /// skipping, bit for bit: the same mask with its masked entries a quarter of the
    /// way up, which no row skips and which makes their probabilities 0 all the same.
    #[test]
    fn skipping_the_future_keys_of_a_causal_mask_changes_no_bit(
        seed in 0u64..10_000,
        batch in 1usize..3,
        kv_heads in 1usize..3,
        group in prop_oneof![Just(1usize), Just(2), Just(4)],
        hd in prop_oneof![1usize..20, 60usize..70],
        tq in 2usize..20,
        past in 0usize..12,
        half in any::<bool>(),
    ) {
        let heads = kv_heads * group;
        let dtype = if half { DType::Bf16 } else { DType::F32 };
        let mut rng = SplitMix64::new(seed);
        let len = past + tq;
        let q = random(dtype, &[batch, heads, tq, hd], &mut rng);
        let k = random(dtype, &[batch, kv_heads, len, hd], &mut rng);
        let v = random(dtype, &[batch, kv_heads, len, hd], &mut rng);
        let scale = 1.0 / (hd as f32).sqrt();
        let floor = if half { f32::from_bits(0xff7f_0000) } else { f32::MIN };
        let skipped = causal_mask(dtype, batch, tq, past, floor);
        let whole = causal_mask(dtype, batch, tq, past, floor / 4.0);
        let got = attention(&q, &k, &v, scale, &skipped, None).expect("runs");
        let want = attention(&q, &k, &v, scale, &whole, None).expect("runs");
        prop_assert_eq!(bits(&got), bits(&want));
        assert_close(&got, &reference(&q, &k, &v, scale, &skipped, (1.0, 1.0)), &v, 1.0,
            if half { 3e-2 } else { 2e-5 });
    }
}

/// The bits of `t`'s values, with every NaN as one pattern (compact storage keeps that
/// a value is NaN, not its payload).
fn bits(t: &Tensor) -> Vec<u32> {
    t.to_vec_f32()
        .iter()
        .map(|x| if x.is_nan() { f32::NAN } else { *x }.to_bits())
        .collect()
}

/// `t` (an E4M3 tensor holding `f32` values) in compact storage, same view.
fn compact(t: &Tensor) -> Tensor {
    let c = t.to_compact_storage().expect("exact E4M3 values");
    assert!(matches!(c.buffer(), Buffer::U8(_)));
    c
}

/// E4M3 codes of random values over a wide range (subnormals, saturation, zeros of
/// both signs), with a NaN now and then when `nan`.
fn spread_codes(shape: &[usize], nan: bool, rng: &mut SplitMix64) -> Tensor {
    let n: usize = shape.iter().product();
    let vals = (0..n)
        .map(|_| match rng.below(50) {
            0 => -0.0,
            1 if nan => f32::NAN,
            _ => (rng.normal() * 10f64.powf(rng.uniform(-3.0, 2.5))) as f32,
        })
        .collect();
    Tensor::from_f32(E4M3, shape, vals).expect("sizes match")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn attention_over_compact_caches_equals_f32_storage_bit_for_bit(
        seed in 0u64..10_000,
        batch in 1usize..3,
        kv_heads in 1usize..3,
        group_pick in 0usize..4,
        hd in prop_oneof![1usize..20, 60usize..70, Just(128usize), Just(131usize)],
        tq in prop_oneof![Just(1usize), 2usize..4],
        len in 1usize..70,
        spare in 0usize..5,
        masked_row in any::<bool>(),
        half in any::<bool>(),
        nan in any::<bool>(),
    ) {
        let group = [1, 2, 4, 9][group_pick];
        let heads = kv_heads * group;
        let dtype = if half { DType::Bf16 } else { DType::F32 };
        let mut rng = SplitMix64::new(seed);
        let q = random(dtype, &[batch, heads, tq, hd], &mut rng);
        // Caches with spare capacity, as a session holds them.
        let cache = |rng: &mut SplitMix64| {
            spread_codes(&[batch, kv_heads, len, hd], nan, rng)
                .with_capacity(2, len + spare)
                .expect("axis")
        };
        let (k, v) = (cache(&mut rng), cache(&mut rng));
        let mask = random_mask(dtype, batch, tq, len, masked_row, &mut rng);
        let scale = 1.0 / (hd as f32).sqrt();
        let scales = Some((0.0123f32, 0.0456f32));
        let want = attention(&q, &k, &v, scale, &mask, scales).expect("runs");
        let got = attention(&q, &compact(&k), &compact(&v), scale, &mask, scales).expect("runs");
        prop_assert_eq!(bits(&got), bits(&want));
        // One compact operand is decoded into a copy; still the same result.
        let mixed = attention(&q, &compact(&k), &v, scale, &mask, scales).expect("runs");
        prop_assert_eq!(bits(&mixed), bits(&want));
        // A strided compact view takes the gathering path (`strided` checks its copy
        // with an equality that NaNs fail).
        if !nan {
            let sk = compact(&strided(&k));
            let strided_v = attention(&q, &sk, &compact(&strided(&v)), scale, &mask, scales)
                .expect("runs");
            prop_assert_eq!(bits(&strided_v), bits(&want));
        }
    }

    #[test]
    fn append_into_a_compact_cache_equals_f32_storage_bit_for_bit(
        seed in 0u64..10_000,
        kv_heads in 1usize..4,
        hd in 1usize..40,
        len in 0usize..20,
        spare in 0usize..3,
        n in 1usize..3,
        strided_new in any::<bool>(),
    ) {
        let mut rng = SplitMix64::new(seed);
        let past = spread_codes(&[1, kv_heads, len, hd], true, &mut rng)
            .with_capacity(2, len + spare)
            .expect("axis");
        let new = random(DType::F32, &[1, kv_heads, n, hd], &mut rng);
        let new = if strided_new { strided(&new) } else { new };
        let s = 0.0137f32;
        let scaled = |x: f32| round_to(E4M3, x / s);
        let (mut wide, mut bytes) = (past.clone(), compact(&past));
        drop(past);
        let (want, copied_f32) = append(&mut wide, &new, 2, scaled, None).expect("appends");
        let (got, copied) = append(&mut bytes, &new, 2, scaled, None).expect("appends");
        prop_assert!(matches!(got.buffer(), Buffer::U8(_)));
        prop_assert_eq!(bits(&got), bits(&want));
        // The same bytes are counted, in place or copied to grow.
        prop_assert_eq!(copied, copied_f32);
        prop_assert_eq!(copied == 0, spare >= n || len == 0);
        prop_assert_eq!(got.bytes(), want.bytes());
        // `kv.append` (the cache's own rounding) stores the same bytes too.
        let codes = codes(&new, 1.0);
        let (mut wide, mut bytes) = (want.clone(), compact(&want));
        drop((want, got));
        let (want, _) = kv_append(&mut wide, &codes, None).expect("appends");
        let (got, _) = kv_append(&mut bytes, &codes, None).expect("appends");
        prop_assert_eq!(bits(&got), bits(&want));
    }
}

#[test]
fn decode_attention_over_compact_caches_appends_in_place_and_equals_f32_storage() {
    let mut rng = SplitMix64::new(21);
    let (kv_heads, heads, hd, len) = (2, 4, 20, 9);
    let q = random(DType::F32, &[1, heads, 1, hd], &mut rng);
    let k = random(DType::F32, &[1, kv_heads, 1, hd], &mut rng);
    let v = random(DType::F32, &[1, kv_heads, 1, hd], &mut rng);
    let cos = random(DType::F32, &[1, 1, 1, hd], &mut rng);
    let sin = random(DType::F32, &[1, 1, 1, hd], &mut rng);
    let mask = random_mask(DType::F32, 1, 1, len + 1, false, &mut rng);
    let cache = |rng: &mut SplitMix64| {
        spread_codes(&[1, kv_heads, len, hd], false, rng)
            .with_capacity(2, len + 4)
            .expect("axis")
    };
    let (pk, pv) = (cache(&mut rng), cache(&mut rng));
    let run = |mut ck: Tensor, mut cv: Tensor| {
        let caches = Caches {
            past_k: &mut ck,
            past_v: &mut cv,
            scales: Some((0.02, 0.03)),
            ring: None,
        };
        decode_attention(&q, &k, &v, &cos, &sin, caches, 0.2, &mask).expect("runs")
    };
    let ([out_c, k_c, v_c], copied) = run(compact(&pk), compact(&pv));
    assert_eq!(copied, 0);
    assert!(matches!(k_c.buffer(), Buffer::U8(_)));
    assert_eq!(k_c.storage_len(), kv_heads * (len + 4) * hd);
    let ([out_f, k_f, v_f], _) = run(pk, pv);
    assert_eq!(bits(&out_c), bits(&out_f));
    assert_eq!(bits(&k_c), bits(&k_f));
    assert_eq!(bits(&v_c), bits(&v_f));
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let mut rng = SplitMix64::new(7);
    // Large enough to run in parallel; one KV head (MQA) makes the kernel split a
    // group's rows over the threads, the other shape splits the KV heads.
    for (kv_heads, group) in [(1, 8), (4, 2), (12, 1)] {
        let heads = kv_heads * group;
        let q = random(DType::F32, &[1, heads, 1, 64], &mut rng);
        let k = random(DType::F32, &[1, kv_heads, 300, 64], &mut rng);
        let v = random(DType::F32, &[1, kv_heads, 300, 64], &mut rng);
        let mask = random_mask(DType::F32, 1, 1, 300, false, &mut rng);
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool")
                .install(|| attention(&q, &k, &v, 0.125, &mask, None).expect("runs"))
                .to_vec_f32()
        };
        let one = run(1);
        assert_eq!(one, run(2), "2 threads, {kv_heads} KV heads");
        assert_eq!(one, run(3), "3 threads, {kv_heads} KV heads");
    }
}

#[test]
fn no_keys_give_zeros_and_bad_operands_are_errors() {
    let mut rng = SplitMix64::new(3);
    let q = random(DType::F32, &[1, 2, 1, 4], &mut rng);
    let empty = Tensor::zeros(DType::F32, &[1, 1, 0, 4]).expect("valid");
    let mask = Tensor::zeros(DType::F32, &[1, 1, 1, 0]).expect("valid");
    // The eager `p @ v` of an empty contraction is zero.
    let out = attention(&q, &empty, &empty, 1.0, &mask, None).expect("runs");
    assert_eq!(out.to_vec_f32(), [0.0; 8]);
    let k = random(DType::F32, &[1, 1, 5, 4], &mut rng);
    let wide = Tensor::zeros(DType::F32, &[1, 1, 2, 5]).expect("valid");
    assert!(
        attention(&q, &k, &k, 1.0, &wide, None).is_err(),
        "mask rows"
    );
    let deep = Tensor::zeros(DType::F32, &[1, 1, 1, 1, 5]).expect("valid");
    assert!(
        attention(&q, &k, &k, 1.0, &deep, None).is_err(),
        "mask rank"
    );
    let fp8 = codes(&k, 0.1);
    let ok = Tensor::zeros(DType::F32, &[1, 1, 1, 5]).expect("valid");
    assert!(
        attention(&q, &fp8, &fp8, 1.0, &ok, None).is_err(),
        "FP8 without scales"
    );
    assert!(attention(&q, &fp8, &fp8, 1.0, &ok, Some((0.1, 0.1))).is_ok());
}

#[test]
fn decode_attention_over_an_fp8_cache_matches_the_reference() {
    let mut rng = SplitMix64::new(11);
    let (kv_heads, heads, hd, past) = (2, 8, 12, 9);
    let q = random(DType::F32, &[1, heads, 1, hd], &mut rng);
    let k = random(DType::F32, &[1, kv_heads, 1, hd], &mut rng);
    let v = random(DType::F32, &[1, kv_heads, 1, hd], &mut rng);
    let cos = random(DType::F32, &[1, 1, 1, hd], &mut rng);
    let sin = random(DType::F32, &[1, 1, 1, hd], &mut rng);
    let (ks, vs) = (0.02f32, 0.03f32);
    let pk = codes(&random(DType::F32, &[1, kv_heads, past, hd], &mut rng), ks);
    let pv = codes(&random(DType::F32, &[1, kv_heads, past, hd], &mut rng), vs);
    let (mut ck, mut cv) = (
        pk.with_capacity(2, 32).expect("axis"),
        pv.with_capacity(2, 32).expect("axis"),
    );
    let mask = random_mask(DType::F32, 1, 1, past + 1, false, &mut rng);
    let caches = Caches {
        past_k: &mut ck,
        past_v: &mut cv,
        scales: Some((ks, vs)),
        ring: None,
    };
    let ([out, k_all, v_all], copied) =
        decode_attention(&q, &k, &v, &cos, &sin, caches, 0.3, &mask).expect("runs");
    assert_eq!(copied, 0);
    let k_rot = rope(&k, &cos, &sin).expect("rope");
    assert_eq!(
        k_all.to_vec_f32(),
        cat(&[&pk, &codes(&k_rot, ks)], 2)
            .expect("cats")
            .to_vec_f32()
    );
    assert_eq!(
        v_all.to_vec_f32(),
        cat(&[&pv, &codes(&v, vs)], 2).expect("cats").to_vec_f32()
    );
    let q_rot = rope(&q, &cos, &sin).expect("rope");
    let want = reference(
        &q_rot,
        &k_all,
        &v_all,
        0.3,
        &mask,
        (f64::from(ks), f64::from(vs)),
    );
    assert_close(&out, &want, &v_all, f64::from(vs), 2e-5);
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
    let (all, copied) = kv_append(&mut owned, &new, None).expect("appends");
    assert_eq!(copied, 0);
    assert_eq!(all.to_vec_f32(), expected.to_vec_f32());
    // Along the last axis too, where a row of the input is the appended span.
    let row = random(DType::F32, &[3, 4], &mut rng);
    let more = random(DType::F32, &[2, 3], &mut rng)
        .transpose(0, 1)
        .expect("axes");
    let mut owned = row.with_capacity(1, 6).expect("axis");
    let (all, _) = append(&mut owned, &more, 1, |x| x, None).expect("appends");
    assert_eq!(
        all.to_vec_f32(),
        cat(&[&row, &more], 1).expect("cats").to_vec_f32()
    );
}

/// A sliding window's ring of `W` positions: it grows like any cache until it holds
/// `W`, then the entry of step `S` overwrites slot `S mod W` in place, and the ring
/// always holds the last `W` entries (in slot order, not position order).
#[test]
fn a_full_ring_overwrites_the_slot_that_left_the_window() {
    const W: usize = 4;
    let mut rng = SplitMix64::new(11);
    let entries: Vec<Tensor> = (0..11)
        .map(|_| random(DType::F32, &[1, 2, 1, 3], &mut rng))
        .collect();
    let mut cache = Tensor::zeros_with_capacity(DType::F32, &[1, 2, 0, 3], 2, W).expect("c");
    for (written, entry) in entries.iter().enumerate() {
        let ring = Some(Ring { window: W, written });
        let (all, copied) = kv_append(&mut cache, entry, ring).expect("appends");
        assert_eq!(copied, 0, "step {written}: the ring never grows its buffer");
        assert_eq!(all.shape(), [1, 2, (written + 1).min(W), 3]);
        // Slot `p mod W` holds position `p` for the last `W` positions.
        let first = (written + 1).saturating_sub(W);
        for (p, entry) in entries.iter().enumerate().take(written + 1).skip(first) {
            let slot = all.slice(2, p % W, p % W + 1).expect("a slot");
            assert_eq!(slot.to_vec_f32(), entry.to_vec_f32(), "step {written}");
        }
        cache = all;
    }
    // A prefill step's entries into a full ring go to consecutive slots mod `W`:
    // positions 11 and 12 to slots 3 and 0; six at once (positions 13..19) keep only
    // the last four, in slots 1, 2, 3, 0.
    let two = random(DType::F32, &[1, 2, 2, 3], &mut rng);
    let ring = Some(Ring {
        window: W,
        written: 11,
    });
    let (all, copied) = kv_append(&mut cache, &two, ring).expect("appends two");
    assert_eq!((all.shape(), copied), (&[1, 2, W, 3][..], 0));
    for (i, slot) in [3, 0].into_iter().enumerate() {
        let got = all.slice(2, slot, slot + 1).expect("a slot").to_vec_f32();
        let want = two.slice(2, i, i + 1).expect("an entry").to_vec_f32();
        assert_eq!(got, want, "position {}", 11 + i);
    }
    let six = random(DType::F32, &[1, 2, 6, 3], &mut rng);
    let mut cache = all;
    let ring = Some(Ring {
        window: W,
        written: 13,
    });
    let (all, _) = kv_append(&mut cache, &six, ring).expect("appends six");
    for i in 2..6 {
        let slot = (13 + i) % W;
        let got = all.slice(2, slot, slot + 1).expect("a slot").to_vec_f32();
        let want = six.slice(2, i, i + 1).expect("an entry").to_vec_f32();
        assert_eq!(got, want, "position {}", 13 + i);
    }
    // A ring whose length disagrees with the entries written before is refused.
    let ring = Some(Ring {
        window: W,
        written: 2,
    });
    let mut cache = all;
    assert!(kv_append(&mut cache, &two, ring).is_err());
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
        ring: None,
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
