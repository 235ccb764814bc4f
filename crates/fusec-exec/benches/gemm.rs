//! The prefill GEMM in isolation against the FMA peak measured in the same run:
//! `cargo bench -p fusec-exec --bench gemm`. Shapes of `examples/llama-125m.toml`'s
//! linear layers over 512 and 128 prompt rows; the peak is one thread per team
//! thread running independent AVX-512 (else AVX2) FMAs at once. Each figure is the
//! median over the rounds, both per second of wall time and per second of this
//! process's CPU time (`CLOCK_PROCESS_CPUTIME_ID`, every thread, the team's spinning
//! included), which other tenants of a shared machine do not move: the ratio of the
//! second kind is the kernel's efficiency. Timings are benchmarks, never test
//! assertions.

use std::time::Instant;

use fusec_exec::kernels::gemm;
use fusec_exec::kernels::rowdot::Rows;
use fusec_exec::{team, SplitMix64};

/// CPU seconds this process has used, all threads.
fn cpu_seconds() -> f64 {
    fusec_exec::cputime::process_cpu_seconds().unwrap_or(0.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
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
    let (mut peaks, mut cpu_peaks) = (Vec::new(), Vec::new());
    let mut rates = vec![Vec::new(); shapes.len()];
    let mut cpu_rates = vec![Vec::new(); shapes.len()];
    for _ in 0..rounds {
        let (wall, cpu) = gemm::fma_peak(threads);
        peaks.push(wall);
        cpu_peaks.push(cpu);
        for (i, (&(rows, ins, outs), (x, w))) in shapes.iter().zip(&data).enumerate() {
            // Untimed first, as a prefill step's GEMMs find their buffers in the pool.
            let run = || {
                let y = team::region(|| gemm::gemm(x, rows, ins, Rows::F32(w), outs, &|_, _, v| v));
                drop(std::hint::black_box(y));
            };
            run();
            let flops = 2.0 * (rows * ins * outs) as f64;
            for _ in 0..3 {
                let (start, cpu) = (Instant::now(), cpu_seconds());
                run();
                let secs = start.elapsed().as_secs_f64();
                let cpu_secs = cpu_seconds() - cpu;
                rates[i].push(flops / secs / 1e9);
                cpu_rates[i].push(flops / cpu_secs.max(1e-9) / 1e9);
            }
        }
    }
    let (peak, cpu_peak) = (median(&mut peaks), median(&mut cpu_peaks));
    println!("FMA peak, {threads} threads: {peak:.1} GFLOP/s wall, {cpu_peak:.1} per CPU-second");
    for ((&(rows, ins, outs), r), c) in shapes.iter().zip(&mut rates).zip(&mut cpu_rates) {
        let (g, gc) = (median(r), median(c));
        println!(
            "GEMM {rows}x{ins} by {outs}x{ins}: {g:.1} GFLOP/s ({:.1}% of peak), {gc:.1} per CPU-second ({:.1}%)",
            100.0 * g / peak,
            100.0 * gc / cpu_peak
        );
    }
}
