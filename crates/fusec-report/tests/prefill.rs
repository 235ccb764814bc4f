//! The prefill sweep through the public API: the time to first token is the sum of
//! its chunks' estimates, each chunk's prefill graph at its own cached length; its
//! GEMMs are compute-bound; a missing chunk length is an error naming the variant.

use std::path::Path;

use fusec_ir::cost::{estimate_seconds, graph_cost};
use fusec_ir::step;
use fusec_model::arch::llama::{build as eager_decode_graph, build_with};
use fusec_model::blocks::{Logits, StepDims};
use fusec_model::{parse_model_toml, ModelSpec};
use fusec_report::prefill::chunks;
use fusec_report::{build, Inputs, PrefillGraph, Report, ReportError, Variant};

/// Two layers of an 8B-shaped bf16 Llama: prefill GEMMs wide enough to be compute-bound.
const MODEL: &str = "[model]\nname = \"small\"\narchitecture = \"llama\"\n\
    hidden_size = 4096\nnum_layers = 2\nnum_heads = 32\nnum_kv_heads = 8\n\
    intermediate_size = 14336\nvocab_size = 1000\nrope_theta = 10000.0\n\
    rms_norm_eps = 1e-5\nmax_seq_len = 4096\ndtype = \"bf16\"\n";

fn spec() -> ModelSpec {
    parse_model_toml(Path::new("small.toml"), MODEL).expect("valid model")
}

fn prefill_graph(spec: &ModelSpec, tokens: u64) -> PrefillGraph {
    PrefillGraph {
        variant: "eager".into(),
        tokens,
        graph: build_with(&spec.model, &StepDims::prefill(tokens, Logits::Last))
            .expect("prefill graph"),
    }
}

fn report(
    spec: &ModelSpec,
    prefill: &[PrefillGraph],
    prompts: &[u64],
) -> Result<Report, ReportError> {
    let variants = [Variant {
        name: "eager".into(),
        description: "eager".into(),
        graph: eager_decode_graph(&spec.model).expect("builds"),
    }];
    build(&Inputs {
        spec,
        variants: &variants,
        precision: "bf16",
        gpu: fusec_ir::hardware::gpu("h100-sxm").expect("built in"),
        gpus: &[],
        price_per_hour: 2.5,
        contexts: &[1024],
        batches: &[1],
        prefill,
        prompts,
        prefill_chunk: 512,
        measurements: &[],
        measurements_file: None,
        cpu: None,
        notes: &[],
    })
}

#[test]
fn time_to_first_token_sums_the_chunks_at_their_cached_lengths() {
    let spec = spec();
    let gpu = fusec_ir::hardware::gpu("h100-sxm").expect("built in");
    let graphs = [prefill_graph(&spec, 512), prefill_graph(&spec, 176)];
    let r = report(&spec, &graphs, &[176, 1200]).expect("report");
    let sweep = r.prefill.as_ref().expect("a prefill sweep");
    assert_eq!(sweep.chunk, 512);
    assert_eq!(sweep.points.len(), 2);
    // 1200 tokens: chunks of 512, 512 and 176 after 0, 512 and 1024 cached ones.
    assert_eq!(chunks(1200, 512), vec![512, 512, 176]);
    let mut want = 0.0;
    let mut flops = 0;
    let mut past = 0;
    for t in chunks(1200, 512) {
        let g = &graphs.iter().find(|g| g.tokens == t).expect("graph").graph;
        let cost = graph_cost(g, &step::bindings(1, past)).expect("cost");
        want += estimate_seconds(g, &cost, gpu) * 1e6;
        flops += cost.total.flops;
        past += t;
    }
    let long = &sweep.points[1].variants[0];
    assert_eq!(sweep.points[1].prompt, 1200);
    assert_eq!(long.chunks, 3);
    assert_eq!(long.flops, flops);
    assert!(
        (long.ttft_us - want).abs() <= want * 1e-12,
        "{} vs {want}",
        long.ttft_us
    );
    assert!((long.prefill_tokens_per_s - 1200.0 / (want * 1e-6)).abs() < 1e-6);
    let parts = long.launch_us + long.memory_us + long.compute_us;
    assert!((parts - long.ttft_us).abs() <= long.ttft_us * 1e-9);
    // The prompt's GEMMs do at least two FLOPs per weight per token.
    let m = &spec.model;
    let per_token = 2
        * m.num_layers
        * (m.hidden_size * m.head_dim * (m.num_heads + 2 * m.num_kv_heads)
            + m.num_heads * m.head_dim * m.hidden_size
            + 3 * m.hidden_size * m.intermediate_size);
    assert!(
        long.flops >= per_token * 1200,
        "{} < {}",
        long.flops,
        per_token * 1200
    );
    // Reusing each weight over up to 512 tokens makes the GEMMs compute-bound: math
    // time appears, at most the FLOPs at the bf16 peak.
    assert!(long.compute_us > 0.2 * long.ttft_us, "{long:?}");
    assert!(long.compute_us * 1e-6 <= long.flops as f64 / (gpu.bf16_tflops * 1e12) * (1.0 + 1e-9));
    // The short prompt: one chunk; a longer prompt takes longer to its first token.
    let short = &sweep.points[0].variants[0];
    assert_eq!(short.chunks, 1);
    assert!(short.ttft_us < long.ttft_us);
    // The decode step that follows reads the prompt's KV cache: at 1200 it is slower.
    assert!(short.decode_us_per_token < long.decode_us_per_token);
    // Text and JSON carry the sweep.
    let text = r.render(fusec_report::Format::Text).expect("text");
    assert!(text.contains("time to first token"), "{text}");
    let json = r.render(fusec_report::Format::Json).expect("json");
    assert!(json.contains("\"ttft_us\""));
}

#[test]
fn bad_prompts_and_missing_chunks_are_errors() {
    let spec = spec();
    let graphs = [prefill_graph(&spec, 512)];
    let err = report(&spec, &graphs, &[100]).expect_err("no graph of 100 tokens");
    assert!(err.is_input_error(), "{err}");
    assert!(
        err.to_string()
            .contains("variant `eager` has no prefill graph of 100 tokens"),
        "{err}"
    );
    for (prompt, needle) in [(0, "got 0"), (4096, "got 4096")] {
        let err = report(&spec, &graphs, &[prompt]).expect_err("bad prompt");
        assert!(err.to_string().contains(needle), "{err}");
    }
    // Without prefill graphs there is no sweep.
    assert!(report(&spec, &[], &[512])
        .expect("report")
        .prefill
        .is_none());
}
