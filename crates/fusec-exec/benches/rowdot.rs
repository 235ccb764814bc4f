//! The row-dot kernels at a decode GEMV's shape, timed on one thread: `cargo bench -p
//! fusec-exec --bench rowdot`. Passes over `f32` weight rows of 768 values (the hidden
//! size of `examples/llama-125m.toml`) multiplied into 1 activation row (the
//! single-row kernel) and into 8 (the multi-row kernel of a batch-8 step): 256 MB of
//! rows once, which stream from memory as a decode step's weights do, and 1 MB of rows
//! 64 times, which stay in L2, where the instructions bind rather than the memory.
//! The two row counts alternate, five times each; the best pass of each is reported,
//! with the weights' GB/s and the ratio of the two times (a batch-8 GEMV costs this
//! many batch-1 ones). Timings are benchmarks, never test assertions.

use std::time::Instant;

use fusec_exec::kernels::rowdot::{Activations, Rows};
use fusec_exec::SplitMix64;

fn main() {
    const N: usize = 768;
    let mut rng = SplitMix64::new(5);
    let x: Vec<f32> = (0..8 * N).map(|_| rng.normal() as f32).collect();
    for (name, bytes, passes) in [("from memory", 256 << 20, 1), ("in L2", 1 << 20, 64)] {
        let k = bytes / (4 * N);
        let w: Vec<f32> = (0..k * N).map(|_| rng.normal() as f32).collect();
        let mut out = vec![0.0f32; 8 * k];
        let mut best = [f64::INFINITY; 2];
        for _ in 0..5 {
            for (i, rows) in [1usize, 8].into_iter().enumerate() {
                let acts = Activations::new(&x[..rows * N], Rows::F32(&w));
                let t = Instant::now();
                for _ in 0..passes {
                    acts.dots_rows(rows, N, Rows::F32(&w), &mut out[..rows * k]);
                    std::hint::black_box(&out);
                }
                best[i] = best[i].min(t.elapsed().as_secs_f64());
            }
        }
        let gb = (k * N * 4 * passes) as f64 / 1e9;
        let [one, eight] = best.map(|t| format!("{:.1} ms, {:.2} GB/s", t * 1e3, gb / t));
        println!(
            "f32 weights {name}: 1 row {one}; 8 rows {eight}; 8 rows / 1 row {:.2}x the time",
            best[1] / best[0]
        );
    }
}
