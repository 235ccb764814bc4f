//! Eager decode throughput of the 125M example on random weights.
//!
//! `cargo bench -p fusec-exec --bench eager_decode [-- CONTEXT TIMED_STEPS]`: fills the
//! KV cache to CONTEXT positions (default 128) by feeding random tokens (the first few
//! are the warmup), then times TIMED_STEPS decode steps (default 16) and prints tokens/s
//! and the GB/s of bytes the executor measured moving.

use std::path::Path;
use std::time::Instant;

use fusec_exec::{Executor, Profile, Session, SplitMix64, Weights};
use fusec_model::arch::llama;
use fusec_model::load_model;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let context = args.first().copied().unwrap_or(128);
    let timed = args.get(1).copied().unwrap_or(16);

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/llama-125m.toml");
    let spec = load_model(&path)?;
    let graph = llama::build(&spec.model)?;
    let t = Instant::now();
    let weights = Weights::random(&graph, 0)?;
    println!(
        "{}: {} parameters, random weights in {:.2} s",
        spec.model.name,
        weights.parameter_count(),
        t.elapsed().as_secs_f64()
    );
    let mut session = Session::new(Executor::new(graph, &weights)?, 1)?;
    let mut rng = SplitMix64::new(1);
    let vocab = session.vocab() as u64;
    let t = Instant::now();
    while session.past_len() < context {
        let token = i32::try_from(rng.below(vocab))?;
        session.step(&[token])?;
    }
    println!(
        "prefilled {context} positions in {:.2} s",
        t.elapsed().as_secs_f64()
    );

    let (mut bytes, mut launches) = (0u64, 0u64);
    let mut profile = Profile::new();
    let mut token = i32::try_from(rng.below(vocab))?;
    let t = Instant::now();
    for _ in 0..timed {
        let out = session.step(&[token])?;
        bytes += out.stats.bytes();
        launches = out.stats.launches;
        profile.add(&out.stats);
        token = out.next[0];
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "eager decode, batch 1, context {context}..{}: {:.2} tokens/s, {:.2} GB/s ({} launches, {:.1} MB per step)",
        context + timed,
        timed as f64 / secs,
        bytes as f64 / secs / 1e9,
        launches,
        bytes as f64 / timed.max(1) as f64 / 1e6
    );
    print!("{}", profile.render());
    Ok(())
}
