//! The attention kernel at decode shapes, timed: `cargo bench -p fusec-exec --bench
//! attention`. Timings are benchmarks, never test assertions.

use fusec_exec::kernels::attention::attention;
use fusec_exec::{SplitMix64, Tensor};
use fusec_ir::numerics::round_to;
use fusec_ir::DType;

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
        .map(|&x| round_to(DType::Fp8E4M3, x / s))
        .collect();
    Tensor::from_f32(DType::Fp8E4M3, t.shape(), vals).expect("sizes match")
}

/// Times attention at the decode shape of `examples/llama-125m.toml` (12 heads of 64,
/// 164 positions), per twelve calls (one decode step), over twelve layers' caches
/// (which fit in a 32 MB L3) and over a hundred and twenty (which do not, as in a real
/// step, where the weights streamed between two calls of a layer evict its cache).
fn main() {
    let mut rng = SplitMix64::new(1);
    // `cargo bench` passes `--bench`; any other argument keeps only the cases whose
    // names contain it (and skips the prefill).
    let only = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    for (name, batch, kv_heads, group, fp8, compact, layers) in [
        ("llama-125m f32, in L3", 1, 12, 1, false, false, 12),
        ("llama-125m f32, from memory", 1, 12, 1, false, false, 120),
        (
            "llama-125m fp8 in f32, from memory",
            1,
            12,
            1,
            true,
            false,
            120,
        ),
        (
            "llama-125m fp8 bytes, from memory",
            1,
            12,
            1,
            true,
            true,
            120,
        ),
        ("gqa 32/8 fp8 bytes, from memory", 1, 8, 4, true, true, 120),
        ("gqa 32/8 f32, from memory", 1, 8, 4, false, false, 120),
        // A batched decode step (issue 15): eight sequences, each with its own cache.
        ("llama-125m f32 batch 8, in L3", 8, 12, 1, false, false, 2),
        (
            "llama-125m f32 batch 8, from memory",
            8,
            12,
            1,
            false,
            false,
            60,
        ),
    ] {
        if only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
            continue;
        }
        let (len, hd) = (164, 64);
        let heads = kv_heads * group;
        let scales = fp8.then_some((0.01f32, 0.02f32));
        let caches: Vec<(Tensor, Tensor)> = (0..layers)
            .map(|_| {
                let k = random(DType::F32, &[batch, kv_heads, len, hd], &mut rng);
                let v = random(DType::F32, &[batch, kv_heads, len, hd], &mut rng);
                // A session stores FP8 caches compactly, one byte per value.
                let store = |t: Tensor| match compact {
                    true => t.to_compact_storage().expect("E4M3 values"),
                    false => t,
                };
                match scales {
                    Some((ks, vs)) => (store(codes(&k, ks)), store(codes(&v, vs))),
                    None => (k, v),
                }
            })
            .collect();
        let q = random(DType::F32, &[batch, heads, 1, hd], &mut rng);
        let mask = Tensor::zeros(DType::F32, &[1, 1, 1, len]).expect("valid");
        let pass = || {
            let t = std::time::Instant::now();
            for (k, v) in &caches {
                std::hint::black_box(attention(&q, k, v, 0.125, &mask, scales).expect("runs"));
            }
            t.elapsed().as_secs_f64() * 12.0 / layers as f64
        };
        pass();
        let times: Vec<f64> = (0..3000 / layers).map(|_| pass()).collect();
        let best = times.iter().copied().fold(f64::INFINITY, f64::min);
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        // The bytes the caches' buffers hold: 4 per value stored as f32, 1 per value
        // of a compact FP8 cache.
        let size = if compact { 1 } else { 4 };
        let bytes = (2 * 12 * batch * kv_heads * len * hd * size) as f64;
        eprintln!(
            "{name}: {:.3} ms per step (best {:.3}), {:.1} GB/s at the best",
            mean * 1e3,
            best * 1e3,
            bytes / best / 1e9
        );
    }
    if only.is_none() {
        prefill(&mut rng);
    }
}

/// A 512-token prefill chunk's attention at the 125M example's heads (12 of 64), with
/// the causal mask of `torch.finfo(f32).min` a prefill session makes (each row skips
/// its future keys) and with the same mask's masked entries a quarter of the way up
/// (no row skips; the same result, bit for bit): the ratio is what skipping saves.
fn prefill(rng: &mut SplitMix64) {
    let (t, hd, heads) = (512, 64, 12);
    let q = random(DType::F32, &[1, heads, t, hd], rng);
    let k = random(DType::F32, &[1, heads, t, hd], rng);
    let v = random(DType::F32, &[1, heads, t, hd], rng);
    let causal = |masked: f32| {
        let m = (0..t * t)
            .map(|i| if i % t <= i / t { 0.0 } else { masked })
            .collect();
        Tensor::from_f32(DType::F32, &[1, 1, t, t], m).expect("sizes match")
    };
    let (skipping, whole) = (causal(f32::MIN), causal(f32::MIN / 4.0));
    let time = |mask: &Tensor| {
        let started = std::time::Instant::now();
        std::hint::black_box(attention(&q, &k, &v, 0.125, mask, None).expect("runs"));
        started.elapsed().as_secs_f64()
    };
    let (mut best_skip, mut best_whole) = (f64::INFINITY, f64::INFINITY);
    // Alternated, so that both see the same machine.
    for _ in 0..8 {
        best_skip = best_skip.min(time(&skipping));
        best_whole = best_whole.min(time(&whole));
    }
    eprintln!(
        "prefill 512 causal, one layer: {:.2} ms skipping future keys, {:.2} ms reading them all: {:.2}x",
        best_skip * 1e3,
        best_whole * 1e3,
        best_whole / best_skip
    );
}
