//! CPU decode: eager, fused f32, fused bf16 and fused fp8 side by side on the 125M
//! example and the fixture-sized model, against the read bandwidth measured in the
//! same run (the method is `fusec::bench`'s).
//!
//! `cargo bench --bench decode [-- CONTEXT STEPS]` (defaults 128 and 32).

use std::path::Path;

use fusec::bench::{self, Options};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let opts = Options {
        context: args.first().copied().unwrap_or(128),
        steps: args.get(1).copied().unwrap_or(32),
        seed: 0,
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for model in ["examples/llama-125m.toml", "examples/tiny.toml"] {
        let spec = fusec::pipeline::load(&root.join(model), None, None)?;
        print!("{}", bench::run_model(&spec, &opts)?.render());
    }
    if let Some(hwm) = bench::proc_status_bytes("VmHWM:") {
        println!("peak resident memory (VmHWM): {:.0} MB", hwm as f64 / 1e6);
    }
    Ok(())
}
