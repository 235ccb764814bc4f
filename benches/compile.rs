//! Compile-time benchmark: the whole pipeline (frontend, eager graph, fusion, dumps)
//! on Llama-3-70B, and its growth with the number of layers.
//!
//! `cargo bench --bench compile`. Prints the median of 5 runs for 10, 20, 40 and 80
//! layers, and the time per layer, which stays flat when compile time is linear.

use std::path::Path;
use std::time::{Duration, Instant};

use fusec::pipeline;

fn compile_once(
    spec: &fusec::model::frontend::ModelSpec,
    rules: &fusec::rewrite::RuleSet,
) -> Duration {
    let start = Instant::now();
    let eager = pipeline::eager(spec).expect("eager graph builds");
    let (fused, _) = pipeline::fuse(spec, &eager, rules).expect("fusion succeeds");
    let _ = fusec::ir::text::print(&eager).expect("acyclic");
    let _ = fusec::ir::text::print(&fused).expect("acyclic");
    start.elapsed()
}

fn main() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/llama-3-70b.toml");
    let base = pipeline::load(&path, None, None).expect("the example loads");
    let rules = pipeline::rules(&[]).expect("built-in rules load");
    println!("{:>8} {:>12} {:>14}", "layers", "median ms", "ms per layer");
    for layers in [10, 20, 40, 80] {
        let mut spec = base.clone();
        spec.model.num_layers = layers;
        let mut times: Vec<Duration> = (0..5).map(|_| compile_once(&spec, &rules)).collect();
        times.sort();
        let median = times[2].as_secs_f64() * 1e3;
        println!(
            "{layers:>8} {median:>12.1} {:>14.3}",
            median / layers as f64
        );
    }
}
