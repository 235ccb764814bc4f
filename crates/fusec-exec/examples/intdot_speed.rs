//! Single-thread speed of the integer GEMV kernels (`intdot::dots`) on one activation
//! row, per CPU second of this process (so that other tenants' load on a shared machine
//! does not count): a 2048 x 768 weight (the 125M model's MLP, in L2) and a 32000 x
//! 768 one (its LM head, streamed from memory), Q8_0 and Q4_0, each as one call over
//! all rows ("whole") and as one call per row ("per-row", what the decode GEMV did
//! before it handed the kernel whole chunks).
//!
//! `cargo run --release -p fusec-exec --example intdot_speed`

use fusec_exec::cputime::process_cpu_seconds;
use fusec_exec::kernels::intdot::{self, IntRows};

fn main() {
    let ins = 768;
    for &(rows, reps) in &[(2048usize, 400usize), (32000, 20)] {
        let x: Vec<f32> = (0..ins)
            .map(|j| ((j * 37 % 101) as f32 - 50.0) * 0.01)
            .collect();
        let acts = intdot::quantize_q8(&x, ins).expect("whole blocks");
        let a = acts.row(0, ins);
        let mut rng = fusec_weights::SplitMix64::new(7);
        let codes: Vec<u8> = (0..rows * ins)
            .map(|_| (rng.next_u64() >> 56) as u8)
            .collect();
        let packed: Vec<u8> = codes[..rows * ins / 2].to_vec();
        let scales: Vec<f32> = (0..rows * ins / intdot::BLOCK)
            .map(|k| 0.001 * (k % 7) as f32)
            .collect();
        let mut out = vec![0.0f32; rows];
        // Bytes streamed as GGUF stores them: codes and an f16 scale per block.
        let blocks = rows * ins / intdot::BLOCK;
        for (name, w, bytes) in [
            (
                "q8_0",
                IntRows::Q8 {
                    codes: &codes,
                    scales: &scales,
                },
                blocks * 34,
            ),
            (
                "q4_0",
                IntRows::Q4 {
                    packed: &packed,
                    scales: &scales,
                },
                blocks * 18,
            ),
        ] {
            for mode in ["whole", "per-row"] {
                let mut best = f64::MAX;
                for _ in 0..5 {
                    let Some(start) = process_cpu_seconds() else {
                        eprintln!("no process CPU clock");
                        return;
                    };
                    for _ in 0..reps {
                        if mode == "whole" {
                            intdot::dots(a, w, &mut out);
                        } else {
                            for o in 0..rows {
                                let row = w.range(o * ins, (o + 1) * ins);
                                intdot::dots(a, row, &mut out[o..o + 1]);
                            }
                        }
                    }
                    let end = process_cpu_seconds().unwrap_or(start);
                    best = best.min((end - start) / reps as f64);
                }
                println!(
                    "{name} {rows} x {ins} {mode:8} {:8.1} us/call {:6.1} GB/s per CPU-s  (y[0] = {})",
                    best * 1e6,
                    bytes as f64 / best / 1e9,
                    out[0]
                );
            }
        }
    }
}
