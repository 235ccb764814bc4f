//! FP8 numerics of the executor: the quantized GEMV against an exact emulation of what
//! CUDA computes and against an `f64` reference within the analytic error bound,
//! per-channel against per-tensor weight scales, the FP8 KV cache of decode attention,
//! derived weights, and saving.

mod common;

use common::{fuse, Cfg};
use fusec_exec::calibrate::{calibrate_kv_scales, KV_SCALE_MARGIN};
use fusec_exec::kernels::attention::{attention, decode_attention, Caches};
use fusec_exec::kernels::fused::rope;
use fusec_exec::kernels::gemv::{self, GemvWeight, QuantWeight};
use fusec_exec::tensor::Buffer;
use fusec_exec::{Executor, Session, SplitMix64, Tensor, Weights};
use fusec_ir::numerics::{act_block_scale, round_to, FP8_ACT_BLOCK};
use fusec_ir::DType;
use fusec_model::arch::llama;
use fusec_rewrite::precision::{lower_fp8, Fp8Options};
use fusec_weights::quant::{self, Derived};
use fusec_weights::{save_weights, Error as WeightError, WeightTensor};
use proptest::prelude::*;

const E4M3: DType = DType::Fp8E4M3;
/// Half the spacing of E4M3 normals, relative: 3 mantissa bits round to 2^-4.
const U: f64 = 1.0 / 16.0;
/// Half the spacing of E4M3 subnormals (2^-9), in scaled units.
const SUB: f64 = 1.0 / 1024.0;
const F32_EPS: f64 = 1.0 / (1u64 << 24) as f64;

fn gaussian(shape: &[usize], rng: &mut SplitMix64, row_scale: impl Fn(usize) -> f64) -> Tensor {
    let cols = *shape.last().expect("a matrix");
    let n: usize = shape.iter().product();
    let values = (0..n)
        .map(|k| (rng.normal() * row_scale(k / cols)) as f32)
        .collect();
    Tensor::from_f32(DType::F32, shape, values).expect("sizes match")
}

fn quant_weight(w: &Tensor, per_channel: bool) -> QuantWeight {
    let w = w.to_weight().expect("float values");
    let (q, s) = quant::quantize(&w, E4M3, per_channel).expect("quantizes");
    let (q, s) = (Tensor::from_weight(&q), Tensor::from_weight(&s));
    QuantWeight::new(q.expect("rank"), s.expect("rank"), DType::F32, E4M3).expect("valid parts")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// `y = (sum x̂ w_q) * s_w`, `x̂` each activation quantized with its block's scale
    /// and multiplied back in `f32`, with an `f32` sum, and within the bound that E4M3
    /// rounding of both operands allows of the exact `x . w`.
    #[test]
    fn the_fp8_gemv_is_cuda_exact_and_within_its_error_bound(
        seed in 0u64..10_000,
        rows in 1usize..4,
        ins in 1usize..300,
        outs in 1usize..40,
        per_channel in any::<bool>(),
    ) {
        let mut rng = SplitMix64::new(seed);
        let x = gaussian(&[rows, ins], &mut rng, |r| 10f64.powi(r as i32 - 1));
        let w = gaussian(&[outs, ins], &mut rng, |o| 0.02 * (1.0 + o as f64 / 4.0));
        let qw = quant_weight(&w, per_channel);
        let y = gemv::linear(&x, GemvWeight::Quant(&qw)).expect("runs").to_vec_f32();
        let (xs, ws) = (x.to_vec_f32(), w.to_vec_f32());
        let (wq, sw) = (qw.values.to_vec_f32(), qw.scale.to_vec_f32());
        for r in 0..rows {
            let xrow = &xs[r * ins..(r + 1) * ins];
            // Each input's block scale, and the activations as the GEMV multiplies them.
            let sx: Vec<f32> = xrow
                .chunks(FP8_ACT_BLOCK)
                .flat_map(|b| {
                    let s = act_block_scale(b.iter().fold(0.0f32, |m, v| m.max(v.abs())), E4M3);
                    std::iter::repeat_n(s, b.len())
                })
                .collect();
            let xq: Vec<f32> = xrow.iter().zip(&sx).map(|(&v, &s)| round_to(E4M3, v / s) * s).collect();
            for o in 0..outs {
                let s_w = if per_channel { sw[o] } else { sw[0] };
                let wrow = &ws[o * ins..(o + 1) * ins];
                let qrow = &wq[o * ins..(o + 1) * ins];
                let got = f64::from(y[r * outs + o]);
                // The emulation: the products and their sum in f64 (exact), the weight
                // scale after; the kernel's products are exact too (`act_block_scale`),
                // its partial sums rounded to f32.
                let exact: f64 = xq.iter().zip(qrow).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                let abs: f64 = xq.iter().zip(qrow).map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs()).sum();
                let s_w = f64::from(s_w);
                let emulated = exact * s_w;
                let sum_err = (ins as f64 + 2.0) * F32_EPS * abs * s_w;
                prop_assert!((got - emulated).abs() <= sum_err + 1e-30,
                    "r{} o{}: {} vs emulation {}", r, o, got, emulated);
                // The analytic bound against the unquantized weights and activations:
                // each operand is off by at most max(2^-4 |v|, 2^-10 s) (normal or
                // subnormal E4M3, `s` its block's scale), so each product by
                // e_x (|w| + e_w) + |x| e_w.
                let mut bound = sum_err;
                let mut magnitude = 0.0;
                let mut reference = 0.0;
                let mut largest_scale = 0.0f64;
                for ((&a, &b), &s) in xrow.iter().zip(wrow).zip(&sx) {
                    let (a, b, s) = (f64::from(a), f64::from(b), f64::from(s));
                    let ex = (U * a.abs()).max(SUB * s) * (1.0 + 4.0 * F32_EPS);
                    let ew = (U * b.abs()).max(SUB * s_w) * (1.0 + 4.0 * F32_EPS);
                    bound += ex * (b.abs() + ew) + a.abs() * ew;
                    magnitude += (a * b).abs();
                    reference += a * b;
                    largest_scale = largest_scale.max(s);
                }
                let sx = largest_scale;
                prop_assert!((got - reference).abs() <= bound,
                    "r{} o{}: {} vs {}: error {} over the bound {}", r, o, got, reference,
                    (got - reference).abs(), bound);
                // The bound is about 2 * 2^-4 of the magnitude, not vacuous.
                prop_assert!(bound <= 0.2 * magnitude + 1e-3 * sx * s_w * ins as f64);
            }
        }
    }
}

#[test]
fn per_channel_scales_keep_small_rows_precise() {
    let mut rng = SplitMix64::new(7);
    // Rows spanning 2^-20 to 1: one scale for all pushes the small rows into
    // subnormals (or to zero); a scale per row keeps every row at E4M3's precision.
    let w = gaussian(&[21, 64], &mut rng, |o| 2f64.powi(-(o as i32)));
    let row_err = |qw: &QuantWeight| -> Vec<f64> {
        let (q, s, ws) = (
            qw.values.to_vec_f32(),
            qw.scale.to_vec_f32(),
            w.to_vec_f32(),
        );
        (0..21)
            .map(|o| {
                let si = if s.len() == 1 { s[0] } else { s[o] };
                let (mut num, mut den) = (0.0, 0.0);
                for i in o * 64..(o + 1) * 64 {
                    num += (f64::from(q[i] * si) - f64::from(ws[i])).powi(2);
                    den += f64::from(ws[i]).powi(2);
                }
                (num / den).sqrt()
            })
            .collect()
    };
    let (pc, pt) = (quant_weight(&w, true), quant_weight(&w, false));
    assert_eq!(pc.scale.shape(), &[21]);
    assert_eq!(pt.scale.shape(), &[] as &[usize]);
    let (pc, pt) = (row_err(&pc), row_err(&pt));
    assert!(pc.iter().all(|&e| e < 0.04), "per channel: {pc:?}");
    assert!(pt[0] < 0.04, "the largest row is exact either way: {pt:?}");
    assert!(
        pt[16] > 0.1,
        "per tensor loses precision in small rows: {pt:?}"
    );
    assert!(pt[20] > 0.9, "and flushes the smallest to zero: {pt:?}");
    // Per channel, a row's scale is its own absmax / 448.
    let q = quant_weight(&w, true);
    let absmax0 = w.to_vec_f32()[..64]
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()));
    assert_eq!(q.scale.to_vec_f32()[0], absmax0 / 448.0);
    assert!(q.values.to_vec_f32()[..64].iter().any(|v| v.abs() == 448.0));
}

#[test]
fn activations_are_quantized_per_block_of_32() {
    // One row of 40 inputs: a block of 32 holding a large value, then a block of 8
    // holding only small ones.
    let mut x = vec![0.0f32; 40];
    (x[0], x[1], x[2]) = (448.0, 2.24, -3.3);
    (x[32], x[33]) = (0.01, -0.02);
    let q = gemv::quantize_rows(&x, 40, E4M3);
    assert_eq!(q.values.len(), 40);
    // The first block's scale is 448 / 448 = 1: its values are E4M3's own (spacing
    // 0.25 in [2, 4)).
    assert_eq!(q.values[..3], [448.0, 2.25, -3.25]);
    assert!(q.values[3..32].iter().all(|&v| v == 0.0));
    // The second block has its own scale, 0.02 / 448 (rounded up to 16 significant
    // bits, `act_block_scale`): its largest value maps onto
    // -448 and back, and 0.01 keeps E4M3's relative precision (2^-4) instead of
    // falling among the subnormals, as it would under the first block's scale
    // (spacing 2^-9 there, an error of 2.3%).
    let s = act_block_scale(0.02, E4M3);
    assert!(s >= 0.02 / 448.0 && s.to_bits() & 0xFF == 0, "{s}");
    assert_eq!(q.values[33], -448.0 * s);
    assert!(
        (q.values[32] - 0.01).abs() <= 0.01 / 16.0,
        "{}",
        q.values[32]
    );
    assert!(q.values[34..].iter().all(|&v| v == 0.0));
    // Every quantized value times an E4M3 value is exact in f32.
    assert!(fusec_exec::kernels::rowdot::e4m3_products_exact(&q.values));
    // Rows are quantized independently, and an all-zero block stays zero.
    let two = gemv::quantize_rows(&[x.clone(), vec![0.0; 40]].concat(), 40, E4M3);
    assert_eq!(two.values[..40], q.values[..]);
    assert!(two.values[40..].iter().all(|&v| v == 0.0));
}

#[test]
fn an_fp8_kv_cache_stores_x_over_scale_and_reads_back_q_times_scale() {
    let mut rng = SplitMix64::new(3);
    let shape = |l: usize| [1usize, 2, l, 8];
    let random = |s: &[usize], rng: &mut SplitMix64| gaussian(s, rng, |_| 1.0);
    let (q, k, v) = (
        random(&[1, 4, 1, 8], &mut rng),
        random(&shape(1), &mut rng),
        random(&shape(1), &mut rng),
    );
    let cos = random(&[1, 1, 1, 8], &mut rng);
    let sin = random(&[1, 1, 1, 8], &mut rng);
    let (ks, vs) = (0.01f32, 0.02f32);
    let codes = |t: &Tensor, s: f32| {
        let vals = t
            .to_vec_f32()
            .iter()
            .map(|&x| round_to(E4M3, x / s))
            .collect();
        Tensor::from_f32(E4M3, t.shape(), vals).expect("sizes match")
    };
    let (pk, pv) = (random(&shape(5), &mut rng), random(&shape(5), &mut rng));
    let (mut ck, mut cv) = (
        codes(&pk, ks).with_capacity(2, 6).expect("axis"),
        codes(&pv, vs).with_capacity(2, 6).expect("axis"),
    );
    let mask = Tensor::zeros(DType::F32, &[1, 1, 1, 6]).expect("valid");
    let caches = Caches {
        past_k: &mut ck,
        past_v: &mut cv,
        scales: Some((ks, vs)),
        ring: None,
    };
    let ([out, k_all, v_all], copied) =
        decode_attention(&q, &k, &v, &cos, &sin, caches, 0.35, &mask).expect("runs");
    assert_eq!(copied, 0);
    assert_eq!((k_all.dtype(), k_all.bytes()), (E4M3, 2 * 6 * 8));
    let k_rot = rope(&k, &cos, &sin).expect("rope");
    let new_k = codes(&k_rot, ks).to_vec_f32();
    assert_eq!(k_all.slice(2, 5, 6).expect("in range").to_vec_f32(), new_k);
    assert_eq!(
        v_all.slice(2, 5, 6).expect("in range").to_vec_f32(),
        codes(&v, vs).to_vec_f32()
    );
    // The same attention over the caches dequantized (q * scale, rounded to f32).
    let deq = |t: &Tensor, s: f32| {
        let vals = t.to_vec_f32().iter().map(|&c| c * s).collect();
        Tensor::from_f32(DType::F32, t.shape(), vals).expect("sizes match")
    };
    let q_rot = rope(&q, &cos, &sin).expect("rope");
    let want = attention(
        &q_rot,
        &deq(&k_all, ks),
        &deq(&v_all, vs),
        0.35,
        &mask,
        None,
    )
    .expect("runs");
    // The kernel applies the scales to the scores and the probabilities instead of to
    // every cached entry, which rounds differently in the last f32 bits (a few ulps,
    // see the attention module's documentation), far below the FP8 quantization.
    let err = common::rel_l2(&out.to_vec_f32(), &want.to_vec_f32());
    assert!(err <= 1e-6, "relative L2 error {err}");
    // Scales must be given, positive and finite.
    let (mut ck, mut cv) = (codes(&pk, ks), codes(&pv, vs));
    let caches = Caches {
        past_k: &mut ck,
        past_v: &mut cv,
        scales: None,
        ring: None,
    };
    assert!(decode_attention(&q, &k, &v, &cos, &sin, caches, 0.35, &mask).is_err());
}

/// The tiny model fused and lowered to FP8.
fn fp8_graph(cfg: &Cfg) -> (fusec_ir::Graph, fusec_ir::Graph) {
    let mut c = Cfg { ..*cfg };
    c.dtype = DType::Bf16;
    let fused = fuse(&llama::build(&c.model("tiny-bf16")).expect("builds"));
    let lowered = lower_fp8(&fused, &Fp8Options::default()).expect("lowers");
    (fused, lowered)
}

#[test]
fn derived_weights_are_made_from_their_base_and_kv_scales_are_calibrated() {
    let (bf16, fp8) = fp8_graph(&Cfg::tiny());
    let derived = quant::derived_weights(&fp8).expect("derives");
    assert!(matches!(
        derived.get("model.layers.0.mlp.up_proj.weight.fp8"),
        Some(Derived::Gemv {
            per_channel: true,
            to: DType::Bf16,
            ..
        })
    ));
    assert!(matches!(
        derived.get("past.1.value.scale"),
        Some(Derived::KvScale { state }) if state == "past.1.value"
    ));
    // Random weights of the lowered graph need calibrated KV scales.
    let err = Weights::random(&fp8, 4).expect_err("uncalibrated");
    assert!(
        matches!(err, WeightError::Uncalibrated { .. }) && err.is_input_error(),
        "{err}"
    );
    assert!(err.to_string().contains("past.0.key.scale"), "{err}");
    let base = Weights::random(&bf16, 4).expect("random weights");
    let prompt = vec![vec![3, 1, 4, 1, 5]];
    let (scales, absmax) = calibrate_kv_scales(&fp8, &bf16, &base, &prompt).expect("runs");
    assert_eq!(scales.len(), 4);
    for (state, m) in &absmax {
        let s = scales[&format!("{state}.scale")];
        assert_eq!(s, m * KV_SCALE_MARGIN / 448.0);
    }
    let w = quant::lower_weights(&base, &fp8, &scales).expect("lowers");
    let name = "model.layers.0.self_attn.q_proj.weight";
    let (q, s) = quant::quantize(base.get(name).expect("base"), E4M3, true).expect("quantizes");
    assert_eq!(
        w.get(&format!("{name}.fp8")).map(WeightTensor::to_vec_f32),
        Some(q.to_vec_f32())
    );
    assert_eq!(
        w.get(&format!("{name}.scale"))
            .map(WeightTensor::to_vec_f32),
        Some(s.to_vec_f32())
    );
    // A missing base is named.
    let empty = Weights::default();
    let err = quant::lower_weights(&empty, &fp8, &scales).expect_err("no bases");
    assert!(
        err.to_string().contains("model.embed_tokens.weight"),
        "{err}"
    );
    // The lowered graph runs, and its measured counts are the cost model's.
    let exec = Executor::new(fp8.clone(), &w).expect("plans");
    let mut session = Session::with_capacity(exec, 1, 8).expect("session");
    for past in 0..3 {
        let out = session.step(&[past as i32 + 1]).expect("steps");
        let b = fusec_exec::decode::bindings(1, past);
        let predicted = fusec_ir::cost::graph_cost(&fp8, &b).expect("bound");
        assert_eq!(out.stats.launches, predicted.total.launches);
        assert_eq!(out.stats.bytes_read, predicted.total.bytes_read);
        assert_eq!(out.stats.bytes_written, predicted.total.bytes_written);
    }
}

#[test]
fn a_checkpoint_loads_into_the_lowered_graph_and_saved_weights_round_trip() {
    let (bf16, fp8) = fp8_graph(&Cfg::tiny());
    let base = Weights::random(&bf16, 9).expect("random weights");
    let dir = tempfile::tempdir().expect("temp dir");
    let ckpt = dir.path().join("ckpt");
    save_weights(&ckpt, &bf16, &base, &Default::default()).expect("saves");
    // The checkpoint lacks the KV scales: loading says so.
    assert!(matches!(
        Weights::load(&ckpt, &fp8),
        Err(WeightError::Uncalibrated { .. })
    ));
    let prompt = vec![vec![2, 7, 1]];
    let (scales, _) = calibrate_kv_scales(&fp8, &bf16, &base, &prompt).expect("runs");
    let w = quant::lower_weights(&base, &fp8, &scales).expect("lowers");
    let saved = dir.path().join("fp8");
    save_weights(&saved, &fp8, &w, &Default::default()).expect("saves");
    let loaded = Weights::load(&saved, &fp8).expect("loads back");
    let run = |w: &Weights| {
        let exec = Executor::new(fp8.clone(), w).expect("plans");
        Session::new(exec, 1)
            .expect("session")
            .generate(&prompt, 5)
            .expect("decodes")
    };
    let (a, b) = (run(&w), run(&loaded));
    assert_eq!(a.logits, b.logits);
    assert_eq!(a.generated, b.generated);
    // A checkpoint with the KV scales but not the quantized values derives them.
    let mut tensors = common::graph_weights(&bf16, &base);
    tensors.extend(
        scales
            .iter()
            .map(|(n, s)| (n.clone(), WeightTensor::scalar(*s))),
    );
    let mixed = dir.path().join("mixed.safetensors");
    common::write_safetensors(&mixed, &tensors, safetensors::Dtype::F32);
    let derived = Weights::load(&mixed, &fp8).expect("derives at load");
    assert_eq!(run(&derived).logits, a.logits);
}

#[test]
fn compact_kv_caches_decode_bit_identically_to_f32_ones() {
    let (bf16, fp8) = fp8_graph(&Cfg::tiny());
    let base = Weights::random(&bf16, 12).expect("random weights");
    let prompt = vec![vec![5, 3, 9, 2], vec![1, 8, 2, 7]];
    let (scales, _) = calibrate_kv_scales(&fp8, &bf16, &base, &prompt).expect("runs");
    let w = quant::lower_weights(&base, &fp8, &scales).expect("lowers");
    // A capacity of 6 makes the caches grow (by copying) during the run.
    let session = |compact: bool| {
        let exec = Executor::new(fp8.clone(), &w).expect("plans");
        Session::with_cache_storage(exec, 2, 6, compact).expect("session")
    };
    let (mut bytes, mut wide) = (session(true), session(false));
    let storage = |s: &Session| {
        let cache = s.state("past.0.key").expect("a cache");
        (cache.dtype(), matches!(cache.buffer(), Buffer::U8(_)))
    };
    assert_eq!(storage(&bytes), (E4M3, true));
    assert_eq!(storage(&wide), (E4M3, false));
    let (a, b) = (
        bytes.generate(&prompt, 6).expect("decodes"),
        wide.generate(&prompt, 6).expect("decodes"),
    );
    let logit_bits =
        |g: &fusec_exec::Generation| g.logits.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(logit_bits(&a), logit_bits(&b));
    assert_eq!(a.generated, b.generated);
    // The caches hold the same values, and stay compact after growing.
    assert_eq!(storage(&bytes), (E4M3, true));
    for layer in 0..2 {
        for kind in ["key", "value"] {
            let name = format!("past.{layer}.{kind}");
            let values = |s: &Session| s.state(&name).expect("a cache").to_vec_f32();
            let (x, y) = (values(&bytes), values(&wide));
            assert!(!x.is_empty(), "{name}");
            assert_eq!(
                x.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{name}"
            );
        }
    }
}

#[test]
fn a_less_fused_fp8_graph_runs_its_linears_on_quantized_weights() {
    let mut cfg = Cfg::tiny();
    cfg.dtype = DType::Bf16;
    let eager = llama::build(&cfg.model("tiny-bf16")).expect("builds");
    let limits = fusec_rewrite::Limits {
        iterations: 1,
        ..fusec_rewrite::Limits::default()
    };
    let (partial, _) = common::fuse_with(&eager, limits);
    let mut keep_kv = Fp8Options::default();
    keep_kv
        .keep
        .insert(fusec_rewrite::precision::OpClass::KvCache);
    let partial = lower_fp8(&partial, &keep_kv).expect("lowers");
    let full = lower_fp8(&fuse(&eager), &keep_kv).expect("lowers");
    let linears_on_fp8 = partial
        .node_ids()
        .filter(|&n| {
            *partial.op(n) == fusec_ir::Op::Linear
                && matches!(
                    partial.op(partial.operands(n)[1]),
                    fusec_ir::Op::Dequant { .. }
                )
        })
        .count();
    assert!(linears_on_fp8 > 0, "the partial graph keeps plain linears");
    let run = |g: &fusec_ir::Graph| {
        let w = Weights::random(g, 6).expect("random weights");
        let exec = Executor::new(g.clone(), &w).expect("plans");
        Session::new(exec, 1)
            .expect("session")
            .generate(&[vec![4, 8, 15]], 3)
            .expect("decodes")
    };
    let (a, b) = (run(&partial), run(&full));
    // The GEMVs quantize the same kind of bf16 activations; only attention's softmax
    // arithmetic differs (bf16 probabilities in the eager attention), by about bf16's
    // precision, which FP8 rounding downstream amplifies where a value moves across a
    // rounding boundary. A wrong scale or a dropped quantization would be off by 1.
    for (x, y) in a.rows(0).zip(b.rows(0)) {
        let err = common::rel_l2(x, y);
        assert!(err < 0.1, "relative L2 error {err}");
    }
}
