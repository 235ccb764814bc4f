//! CPU decode: eager, fused f32, fused bf16 and fused fp8 side by side on the 125M
//! example (context 128, 32 steps per round) and the fixture-sized model (context 32,
//! 90 steps per round), against the read bandwidth measured in the same run (the
//! method is `fusec::bench`'s).
//!
//! `cargo bench --bench decode [-- ROUNDS]` (default 5).

use std::path::Path;

use fusec::bench::{self, Options};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (model, context, steps) in [
        ("examples/llama-125m.toml", 128, 32),
        ("examples/tiny.toml", 32, 90),
    ] {
        let spec = fusec::pipeline::load(&root.join(model), None, None)?;
        let opts = Options {
            context,
            steps,
            rounds,
            seed: 0,
            only: Vec::new(),
            max_memory: None,
            prefill: [128, 512]
                .into_iter()
                .filter(|&t| t as u64 <= spec.model.max_seq_len)
                .collect(),
            batches: bench::DEFAULT_BATCHES.to_vec(),
        };
        print!("{}", bench::run_model(&spec, &opts)?.render());
    }
    if let Some(hwm) = bench::proc_status_bytes("VmHWM:") {
        println!("peak resident memory (VmHWM): {:.0} MB", hwm as f64 / 1e6);
    }
    Ok(())
}
