//! The context and batch sweeps through the public API: points sorted and checked,
//! time per token growing with the context and falling with the batch.

use std::path::Path;

use fusec_model::arch::llama::build as eager_decode_graph;
use fusec_model::{parse_model_toml, ModelSpec};
use fusec_report::sweep::{default_batches, default_contexts};
use fusec_report::{build, Bound, Inputs, Report, Variant};

/// A small bf16 Llama with GQA whose KV cache matters at long contexts.
const MODEL: &str = "[model]\nname = \"small\"\narchitecture = \"llama\"\n\
    hidden_size = 256\nnum_layers = 2\nnum_heads = 4\nnum_kv_heads = 2\n\
    intermediate_size = 512\nvocab_size = 1000\nrope_theta = 10000.0\n\
    rms_norm_eps = 1e-5\nmax_seq_len = 32768\ndtype = \"bf16\"\n\
    [decode]\ncontext = 1024\n";

fn spec() -> ModelSpec {
    parse_model_toml(Path::new("small.toml"), MODEL).expect("valid model")
}

fn report(contexts: &[u64], batches: &[u64]) -> Report {
    let spec = spec();
    let graph = eager_decode_graph(&spec.model).expect("builds");
    let variants = [Variant {
        name: "eager".into(),
        description: "eager".into(),
        graph,
    }];
    let gpu = fusec_ir::hardware::gpu("h100-sxm").expect("built in");
    build(&Inputs {
        spec: &spec,
        variants: &variants,
        precision: "bf16",
        gpu,
        gpus: fusec_ir::hardware::GPUS,
        price_per_hour: 2.5,
        contexts,
        batches,
        prefill: &[],
        prompts: &[],
        prefill_chunk: 512,
        measurements: &[],
        measurements_file: None,
        cpu: None,
        notes: &[],
    })
    .expect("report builds")
}

#[test]
fn time_per_token_grows_with_context() {
    let r = report(&[32768, 128, 1024, 8192, 1024], &[1]);
    let points = &r.context_sweep.points;
    // Sorted and without the repeated 1024.
    let contexts: Vec<u64> = points.iter().map(|p| p.context).collect();
    assert_eq!(contexts, [128, 1024, 8192, 32768]);
    for w in points.windows(2) {
        let (a, b) = (&w[0].variants[0], &w[1].variants[0]);
        assert!(b.us_per_token > a.us_per_token, "{a:?} then {b:?}");
        assert!(b.kv_read_bytes > a.kv_read_bytes);
        assert!(b.tokens_per_s < a.tokens_per_s);
    }
    // The KV cache read is proportional to the cached positions:
    // layers * 2 (k, v) * kv_heads * head_dim * 2 bytes per position.
    let per_position = 2 * 2 * 2 * 64 * 2;
    assert_eq!(points[0].variants[0].kv_read_bytes, 127 * per_position);
}

#[test]
fn batching_shares_the_weight_reads() {
    let r = report(&[1024], &[1, 4, 16, 64]);
    let points = &r.batch_sweep.points;
    for w in points.windows(2) {
        let (a, b) = (&w[0].variants[0], &w[1].variants[0]);
        assert!(b.us_per_token < a.us_per_token, "{a:?} then {b:?}");
        assert!(b.tokens_per_s > a.tokens_per_s);
        assert!(b.dollars_per_million_tokens < a.dollars_per_million_tokens);
        // Tokens/s is the batch over the step time.
        let expected = w[1].batch as f64 / (b.us_per_step * 1e-6);
        assert!((b.tokens_per_s - expected).abs() / expected < 1e-12);
    }
    // A small model at batch 1 waits on launches, not memory.
    assert_eq!(points[0].variants[0].bound, Bound::Launch);
}

#[test]
fn sweep_points_are_checked() {
    let spec = spec();
    let graph = eager_decode_graph(&spec.model).expect("builds");
    let variants = [Variant {
        name: "eager".into(),
        description: String::new(),
        graph,
    }];
    let gpu = fusec_ir::hardware::gpu("h100-sxm").expect("built in");
    let inputs = |contexts: &'static [u64], batches: &'static [u64], price: f64| {
        build(&Inputs {
            spec: &spec,
            variants: &variants,
            precision: "bf16",
            gpu,
            gpus: &[],
            price_per_hour: price,
            contexts,
            batches,
            prefill: &[],
            prompts: &[],
            prefill_chunk: 512,
            measurements: &[],
            measurements_file: None,
            cpu: None,
            notes: &[],
        })
    };
    for (result, needle) in [
        (inputs(&[65536], &[1], 2.5), "beyond max_seq_len 32768"),
        (inputs(&[0], &[1], 2.5), "at least 1"),
        (inputs(&[128], &[0], 2.5), "--batch"),
        (inputs(&[128], &[1], 0.0), "--price-per-hour"),
        (inputs(&[128], &[1], f64::NAN), "--price-per-hour"),
    ] {
        let e = result.expect_err(needle);
        assert!(e.is_input_error());
        assert!(e.to_string().contains(needle), "{needle}: {e}");
    }
}

#[test]
fn default_points() {
    assert_eq!(
        default_contexts(8192),
        [128, 256, 512, 1024, 2048, 4096, 8192]
    );
    assert_eq!(default_contexts(128), [16, 32, 64, 128]);
    assert_eq!(default_contexts(10), [10]);
    assert_eq!(default_batches().first(), Some(&1));
    assert_eq!(default_batches().last(), Some(&1024));
}
