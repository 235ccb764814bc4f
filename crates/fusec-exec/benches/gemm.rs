//! The prefill GEMM in isolation against the FMA peak measured in the same run:
//! `cargo bench -p fusec-exec --bench gemm`. Shapes of `examples/llama-125m.toml`'s
//! linear layers over 512 and 128 prompt rows; every figure is the median of the
//! rounds, and the peak is one thread per team thread running independent AVX-512
//! (else AVX2) FMAs at once. Timings are benchmarks, never test assertions.

use std::time::Instant;

use fusec_exec::kernels::gemm;
use fusec_exec::kernels::rowdot::Rows;
use fusec_exec::{team, SplitMix64};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// GFLOP/s of `threads` threads each running the FMA loop for about 50 ms at once.
fn fma_peak(threads: usize) -> f64 {
    let rate = gemm::fma_flops_one_thread(20_000);
    let lanes = gemm::fma_lanes() as f64;
    let iterations = ((0.05 * rate) / (16.0 * lanes * 2.0)).clamp(1e4, 1e9) as usize;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| s.spawn(move || gemm::fma_flops_one_thread(iterations)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(0.0))
            .sum::<f64>()
    }) / 1e9
}

fn main() {
    let threads = team::threads();
    let rounds = 7;
    let mut rng = SplitMix64::new(5);
    // (rows, ins, outs): the MLP's gate/up and down, the attention projections.
    let shapes = [
        (512, 768, 2048),
        (512, 2048, 768),
        (512, 768, 768),
        (128, 768, 2048),
    ];
    let data: Vec<(Vec<f32>, Vec<f32>)> = shapes
        .iter()
        .map(|&(rows, ins, outs)| {
            let x = (0..rows * ins).map(|_| rng.normal() as f32).collect();
            let w = (0..outs * ins).map(|_| rng.normal() as f32).collect();
            (x, w)
        })
        .collect();
    let mut peaks = Vec::new();
    let mut rates = vec![Vec::new(); shapes.len()];
    for _ in 0..rounds {
        peaks.push(fma_peak(threads));
        for (i, (&(rows, ins, outs), (x, w))) in shapes.iter().zip(&data).enumerate() {
            // Untimed first, as a prefill step's GEMMs find their buffers in the pool.
            let run = || {
                let y = team::region(|| gemm::gemm(x, rows, ins, Rows::F32(w), outs, &|_, _, v| v));
                drop(std::hint::black_box(y));
            };
            run();
            let start = Instant::now();
            run();
            let secs = start.elapsed().as_secs_f64();
            rates[i].push(2.0 * (rows * ins * outs) as f64 / secs / 1e9);
        }
    }
    let peak = median(&mut peaks);
    println!("FMA peak, {threads} threads: {peak:.1} GFLOP/s");
    for (&(rows, ins, outs), r) in shapes.iter().zip(&mut rates) {
        let g = median(r);
        println!(
            "GEMM {rows}x{ins} by {outs}x{ins}: {g:.1} GFLOP/s, {:.1}% of peak",
            100.0 * g / peak
        );
    }
}
